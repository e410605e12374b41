//! Reading a partition table from arbitrary bytes: never a panic, and a repair or a flag change
//! on whatever was accepted never writes inside a partition.
#![no_main]

use keelos::block::{BlockDevice, CrashDevice};
use keelos::bootctl::{self, store};
use keelos::disk::{self, table};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let ss = if data[0] & 1 == 0 { 512 } else { 4096 };
    // A disk the size of the smallest KeelOS layout; the first half of the input is its start
    // (MBR, primary header and array), the second half its end (backup array and header), so
    // both copies come from the fuzzer. Seeds in fuzz/seeds/ are real tables cut this way.
    let len: usize = (6 << 20) + (64 << 10);
    let rest = &data[1..];
    let (head, tail) = rest.split_at(rest.len() / 2);
    if head.len() > len / 2 || tail.len() > len / 2 {
        return;
    }
    let mut bytes = vec![0u8; len];
    bytes[..head.len()].copy_from_slice(head);
    bytes[len - tail.len()..].copy_from_slice(tail);
    let mut dev = CrashDevice::from_bytes(bytes, ss);
    let Ok(t) = table::read(&dev) else { return };
    let _ = disk::Layout::from_table(t.clone());
    let Ok(layout) = disk::open(&dev) else {
        let _ = table::repair(&mut dev, &t);
        return;
    };
    dev.clear_write_log();
    let _ = store::update(&mut dev, |f| bootctl::activate(f, bootctl::Slot::B, None, 3));
    for (s, e) in dev.written_ranges() {
        for p in [&layout.esp, &layout.root_a, &layout.root_b, &layout.state] {
            assert!(e <= p.offset || s >= p.offset + p.len, "wrote inside {}", p.label);
        }
    }
    let _ = dev.len();
});
