//! Applying an arbitrary patch to a small source: never a panic, never more output than the
//! limit, never a source read outside the source.
#![no_main]

use keelos::update::bspatch::{Patcher, Step};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let source: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let Ok(mut p) = Patcher::new(data.to_vec(), source.len() as u64, LIMIT) else {
        return;
    };
    let mut produced = 0u64;
    while let Ok(step) = p.step() {
        match step {
            Step::NeedSource { offset, len } => {
                let end = offset as usize + len;
                assert!(end <= source.len(), "source read {offset}+{len} outside the source");
                p.source(source[offset as usize..end].to_vec());
            }
            Step::Output(b) => {
                produced += b.len() as u64;
                assert!(produced <= LIMIT, "output beyond its limit");
            }
            Step::Done => break,
        }
    }
});
