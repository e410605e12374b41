//! Shared set-up for the crash-injection suites.

use keelos::block::{BlockDevice, CrashDevice};
use keelos::disk::{self, LayoutSpec, MIB};

/// The smallest KeelOS disk: 1 MiB partitions, so that cloning it for every crash state is cheap.
pub fn small_spec() -> LayoutSpec {
    LayoutSpec {
        esp_size: MIB,
        root_size: MIB,
        state_size: Some(MIB),
    }
}

pub fn disk_len() -> u64 {
    6 * MIB + 64 * 1024
}

/// A fresh KeelOS disk on a crash-model device, with every partition filled with a recognisable
/// pattern so that a stray write inside one is caught.
pub fn fresh_disk(sector_size: u64) -> CrashDevice {
    let mut dev = CrashDevice::new(disk_len(), sector_size);
    disk::create(&mut dev, small_spec()).expect("create");
    let layout = disk::open(&dev).expect("open");
    for (i, p) in [&layout.esp, &layout.root_a, &layout.root_b, &layout.state]
        .into_iter()
        .enumerate()
    {
        let fill: Vec<u8> = (0..p.len)
            .map(|x| (x as u8) ^ (0x11 * (i as u8 + 1)))
            .collect();
        dev.write_at(p.offset, &fill).expect("fill");
    }
    dev.flush().expect("flush");
    dev.clear_write_log();
    dev
}

/// Panic with `ctx` if anything was written inside a partition since the write log was
/// cleared.
pub fn assert_no_write_inside_partitions(dev: &CrashDevice, layout: &disk::Layout, ctx: &str) {
    for (s, e) in dev.written_ranges() {
        for p in [&layout.esp, &layout.root_a, &layout.root_b, &layout.state] {
            assert!(
                e <= p.offset || s >= p.offset + p.len,
                "write {s}..{e} lands inside {}; {ctx}",
                p.label
            );
        }
    }
}
