//! Two writers of the boot flags on one disk at the same time, as on a node (keel-init's stage 2
//! marking a slot successful while keel-agent invalidates or activates one, or the offline tool
//! beside either): every change is a load-modify-commit through `bootctl::store::update`, and
//! none may be lost.
//!
//! Each writer opens the disk image on its own (its own open file description, as a separate
//! process has) and, many times over, adds one to a counter kept in the flags of both root
//! entries (slot A's priority and tries nibbles are the low byte, slot B's the high byte). If
//! two read-modify-writes interleave, one increment is lost and the final count is short.
#![allow(clippy::unwrap_used, clippy::panic)]

use keelos::block::{BlockDevice, FileDevice};
use keelos::bootctl::{store, BootFlags, SlotFlags};
use keelos::disk::{self, LayoutSpec, MIB};

const WRITERS: usize = 2;
const ROUNDS: u32 = 150;

fn count(f: SlotFlags) -> u32 {
    let nib = |b: BootFlags| u32::from(b.tries()) << 4 | u32::from(b.priority());
    nib(f.b) << 8 | nib(f.a)
}

fn with_count(f: SlotFlags, n: u32) -> SlotFlags {
    let set = |b: BootFlags, v: u32| {
        b.with_priority((v & 0xF) as u8)
            .with_tries(((v >> 4) & 0xF) as u8)
    };
    SlotFlags {
        a: set(f.a, n & 0xFF),
        b: set(f.b, (n >> 8) & 0xFF),
    }
}

#[test]
fn concurrent_flag_writers_lose_no_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(8 * MIB).unwrap();
    }
    let mut dev = FileDevice::open(&path, true).unwrap();
    disk::create(
        &mut dev,
        LayoutSpec {
            esp_size: MIB,
            root_size: MIB,
            state_size: Some(MIB),
        },
    )
    .unwrap();
    dev.flush().unwrap();
    drop(dev);

    std::thread::scope(|s| {
        for w in 0..WRITERS {
            let path = &path;
            s.spawn(move || {
                let mut dev = FileDevice::open(path, true).unwrap();
                for i in 0..ROUNDS {
                    store::update(&mut dev, |f| Ok(with_count(f, count(f) + 1))).unwrap_or_else(
                        |e| panic!("writer {w}, round {i}: the flag change failed: {e}"),
                    );
                }
            });
        }
    });

    let dev = FileDevice::open(&path, false).unwrap();
    let (_, flags) = store::load(&dev).unwrap();
    let want = WRITERS as u32 * ROUNDS;
    assert_eq!(
        count(flags),
        want,
        "{} of {want} flag changes were lost: two read-modify-writes interleaved",
        want - count(flags)
    );
}
