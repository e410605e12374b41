//! The matching half of making a patch: bsdiff 4.3's scan (Colin Percival's algorithm: exact
//! matches found in a suffix array of the source, grown into approximate matches, the bytes
//! between them sent as "extra") with one change for OS images: among the source places that
//! match, it prefers one near where the scan already is.
//!
//! bsdiff takes the longest exact match anywhere in the source. An OS image holds thousands of
//! files that share code and tables (kernel modules: their `__versions` symbol tables, common
//! boilerplate), so the longest match for a piece of a new module is often in another module,
//! and the approximate match grown from it differs from the new bytes far more than the same
//! module's old copy would: the diff stream fills with noise. Here the candidates next to the
//! best one in suffix order are checked too, and one that is nearly as long and lies within
//! [`NEAR`] bytes of the current alignment (or of the last alignment that held for long) wins.
//! `ci/bench` measures what this buys on a real kernel update.
//!
//! With a file map of two SquashFS images ([`diff_files`]), a match inside a file comes from
//! the same file's old version whenever it has one: the same idea, with the file as the place
//! to stay near.
//!
//! Pure and offline: no I/O; it holds the source, its suffix array (4 bytes a source byte) and
//! the three raw streams in memory, like every bsdiff.

use super::sqfsmap::Pair;
use suffix_array::SuffixArray;

/// How far from the expected source position a candidate may lie and still be "near".
pub const NEAR: i64 = 64 << 10;
/// How many suffix-array neighbours on each side of the best match are checked for a near one.
const NEIGHBOURS: usize = 32;
/// An alignment whose approximate match covered at least this many bytes becomes the "home"
/// alignment, the second place near which matches are preferred.
const HOME_MIN: i64 = 512;

/// How [`diff`] picks among the source places that match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    /// Always the longest exact match, as bsdiff 4.3 does.
    Bsdiff,
    /// The longest, unless one at most an eighth shorter lies within [`NEAR`] bytes of the
    /// current alignment or of the home alignment (the default).
    Near,
}

/// The three raw (uncompressed) streams of a bsdiff patch: control tuples (24 bytes each,
/// bsdiff's sign-magnitude integers), diff bytes and extra bytes.
#[derive(Debug, Default)]
pub struct Streams {
    pub ctrl: Vec<u8>,
    pub diff: Vec<u8>,
    pub extra: Vec<u8>,
}

fn lcp(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Index<'a> {
    old: &'a [u8],
    sa: Vec<u32>,
}

impl Index<'_> {
    /// A source position and the length of its exact match with `pat`: the longest one, or one
    /// nearly as long near one of `hints`.
    fn search(&self, pat: &[u8], hints: [i64; 2], matching: Matching) -> (i64, i64) {
        let (old, sa) = (self.old, &self.sa);
        let (mut lo, mut hi) = (0, sa.len());
        while lo < hi {
            let m = lo + (hi - lo) / 2;
            if &old[sa[m] as usize..] < pat {
                lo = m + 1;
            } else {
                hi = m;
            }
        }
        let at = |k: usize| {
            let p = sa[k] as usize;
            (p as i64, lcp(&old[p..], pat) as i64)
        };
        let mut best = (old.len() as i64, 0i64);
        for k in [lo.wrapping_sub(1), lo] {
            if k < sa.len() {
                let c = at(k);
                if c.1 > best.1 {
                    best = c;
                }
            }
        }
        if best.1 == 0 || matching == Matching::Bsdiff {
            return best;
        }
        let dist = |p: i64| {
            hints
                .iter()
                .map(|h| (p - h).abs())
                .min()
                .unwrap_or(i64::MAX)
        };
        if dist(best.0) <= NEAR {
            return best;
        }
        // nearly as long: at most an eighth shorter, and never under 8 bytes
        let floor = (best.1 - best.1 / 8).max(8);
        let mut near: Option<(i64, i64)> = None;
        let mut look = |k: usize| -> bool {
            let c = at(k);
            if c.1 < floor {
                return false;
            }
            if dist(c.0) <= NEAR && near.is_none_or(|n| c.1 > n.1) {
                near = Some(c);
            }
            true
        };
        for k in (0..lo).rev().take(NEIGHBOURS) {
            if !look(k) {
                break;
            }
        }
        for k in (lo..sa.len()).take(NEIGHBOURS) {
            if !look(k) {
                break;
            }
        }
        near.unwrap_or(best)
    }
}

/// Signed-magnitude 64-bit integer, as bsdiff stores it.
fn offtout(x: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(&super::bsdf2::offtout(x));
}

/// Looks for a new file's bytes in its own old version: the suffix arrays of the old ranges of
/// the [`Pair`] the scan is in, built when the scan enters it.
struct FileSearch<'a> {
    old: &'a [u8],
    pairs: &'a [Pair],
    next: usize,
    built: Option<usize>,
    parts: Vec<(i64, Index<'a>)>,
}

impl<'a> FileSearch<'a> {
    /// The longest exact match for `pat` (at new offset `scan`) inside the old version of the
    /// file that holds `scan`, if a file does. `scan` never goes back.
    fn search(&mut self, scan: i64, pat: &[u8]) -> Option<(i64, i64)> {
        while self.pairs.get(self.next)?.new.end as i64 <= scan {
            self.next += 1;
        }
        let p = &self.pairs[self.next];
        if (p.new.start as i64) > scan {
            return None;
        }
        if self.built != Some(self.next) {
            self.parts = p
                .old
                .iter()
                .filter_map(|r| {
                    let bytes = self.old.get(r.start as usize..r.end as usize)?;
                    let (s, sa) = SuffixArray::new(bytes).into_parts();
                    Some((r.start as i64, Index { old: s, sa }))
                })
                .collect();
            self.built = Some(self.next);
        }
        self.parts
            .iter()
            .map(|(at, ix)| {
                let (p, l) = ix.search(pat, [0, 0], Matching::Bsdiff);
                (at + p, l)
            })
            .filter(|m| m.1 > 0)
            .max_by_key(|m| m.1)
    }
}

/// The streams of a patch from `old` to `new`.
pub fn diff(old: &[u8], new: &[u8], matching: Matching) -> Streams {
    diff_files(old, new, matching, &[])
}

/// The streams of a patch from `old` to `new`, where `files` says which old ranges hold the old
/// version of each new file (from [`super::sqfsmap`]; sorted by new offset, not overlapping).
/// Inside a paired file, the longest exact match in the file's old version is taken whenever
/// there is one, however much longer a match elsewhere is; the whole image (with `matching`'s
/// rule) is searched only where the file's old version has no match at all. On the kernel pair
/// of `ci/bench` (brotli 9) this rule gave 15,103,001 B; letting a match elsewhere win when it
/// is over 8/7 as long gave 15,624,724 B, over twice as long 15,538,956 B, and when the file's
/// match is under 16 bytes and the other at least 64, 15,123,083 B (near matching alone:
/// 15,815,669 B).
pub fn diff_files(old: &[u8], new: &[u8], matching: Matching, files: &[Pair]) -> Streams {
    let (s, sa) = SuffixArray::new(old).into_parts();
    let index = Index { old: s, sa };
    let mut in_file = FileSearch {
        old,
        pairs: files,
        next: 0,
        built: None,
        parts: Vec::new(),
    };
    let (oldsize, newsize) = (old.len() as i64, new.len() as i64);
    let o = |i: i64| old[i as usize];
    let n = |i: i64| new[i as usize];
    let mut out = Streams::default();
    out.diff.reserve(new.len());
    let (mut scan, mut len, mut pos) = (0i64, 0i64, 0i64);
    let (mut lastscan, mut lastpos, mut lastoffset, mut home) = (0i64, 0i64, 0i64, 0i64);
    while scan < newsize {
        let mut oldscore = 0i64;
        scan += len;
        let mut scsc = scan;
        while scan < newsize {
            let pat = &new[scan as usize..];
            // the whole image only where the file's old version has no match
            (pos, len) = match in_file.search(scan, pat) {
                Some(f) => f,
                None => index.search(pat, [scan + lastoffset, scan + home], matching),
            };
            while scsc < scan + len {
                let i = scsc + lastoffset;
                if (0..oldsize).contains(&i) && o(i) == n(scsc) {
                    oldscore += 1;
                }
                scsc += 1;
            }
            if (len == oldscore && len != 0) || len > oldscore + 8 {
                break;
            }
            let i = scan + lastoffset;
            if (0..oldsize).contains(&i) && o(i) == n(scan) {
                oldscore -= 1;
            }
            scan += 1;
        }
        if len == oldscore && scan != newsize {
            continue;
        }
        // grow the last match forwards and this one backwards, as bsdiff does
        let (mut s, mut sf, mut lenf) = (0i64, 0i64, 0i64);
        let mut i = 0;
        while lastscan + i < scan && lastpos + i < oldsize {
            if o(lastpos + i) == n(lastscan + i) {
                s += 1;
            }
            i += 1;
            if s * 2 - i > sf * 2 - lenf {
                sf = s;
                lenf = i;
            }
        }
        let mut lenb = 0i64;
        if scan < newsize {
            let (mut s, mut sb) = (0i64, 0i64);
            let mut i = 1;
            while scan >= lastscan + i && pos >= i {
                if o(pos - i) == n(scan - i) {
                    s += 1;
                }
                if s * 2 - i > sb * 2 - lenb {
                    sb = s;
                    lenb = i;
                }
                i += 1;
            }
        }
        if lastscan + lenf > scan - lenb {
            let overlap = (lastscan + lenf) - (scan - lenb);
            let (mut s, mut ss, mut lens) = (0i64, 0i64, 0i64);
            for i in 0..overlap {
                if n(lastscan + lenf - overlap + i) == o(lastpos + lenf - overlap + i) {
                    s += 1;
                }
                if n(scan - lenb + i) == o(pos - lenb + i) {
                    s -= 1;
                }
                if s > ss {
                    ss = s;
                    lens = i + 1;
                }
            }
            lenf += lens - overlap;
            lenb -= lens;
        }
        for i in 0..lenf {
            out.diff.push(n(lastscan + i).wrapping_sub(o(lastpos + i)));
        }
        let extra = (scan - lenb) - (lastscan + lenf);
        out.extra
            .extend_from_slice(&new[(lastscan + lenf) as usize..(scan - lenb) as usize]);
        offtout(lenf, &mut out.ctrl);
        offtout(extra, &mut out.ctrl);
        offtout((pos - lenb) - (lastpos + lenf), &mut out.ctrl);
        if lenf >= HOME_MIN {
            home = lastoffset;
        }
        lastscan = scan - lenb;
        lastpos = pos - lenb;
        lastoffset = pos - scan;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use crate::update::bsdf2::bsdf2_brotli;
    use crate::update::bspatch::apply_in_memory;
    use proptest::prelude::*;

    fn apply(old: &[u8], s: &Streams, new_len: usize) -> Vec<u8> {
        let patch = bsdf2_brotli(s, new_len as u64, 5).unwrap();
        apply_in_memory(old, patch, new_len as u64).unwrap()
    }

    /// The source ranges the add parts of a patch read: (old position, length).
    fn add_ranges(s: &Streams) -> Vec<(i64, i64)> {
        use crate::update::bspatch::offtin as num;
        let mut pos = 0;
        let mut out = Vec::new();
        for t in s.ctrl.chunks(24) {
            let (add, seek) = (num(&t[0..8]), num(&t[16..24]));
            if add > 0 {
                out.push((pos, add));
            }
            pos += add + seek;
        }
        out
    }

    fn noise(seed: u32, len: usize) -> Vec<u8> {
        (0..len as u32)
            .map(|i| ((i ^ seed).wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect()
    }

    #[test]
    fn edge_shapes_round_trip() {
        let r = noise(1, 5000);
        for (old, new) in [
            (vec![], vec![]),
            (vec![], r.clone()),
            (r.clone(), vec![]),
            (r.clone(), r.clone()),
            (vec![0; 4096], vec![0; 8192]),
        ] {
            for m in [Matching::Bsdiff, Matching::Near] {
                let s = diff(&old, &new, m);
                assert_eq!(apply(&old, &s, new.len()), new, "{m:?}");
            }
        }
    }

    /// A module whose new version has an insertion: after it, the longest exact match for the
    /// rest is a copy in another file 200 KB away, 5 % longer than the module's own old bytes.
    /// bsdiff's rule takes the far copy; the near rule stays in the module.
    #[test]
    fn a_nearly_as_long_match_near_the_scan_wins_over_a_far_one() {
        let module = noise(7, 4000);
        let mut new = module[..1000].to_vec();
        new.extend_from_slice(&noise(9, 50)); // inserted
        new.extend_from_slice(&module[1000..]);
        new[1050 + 2000] ^= 0x55; // a relocation after the insertion
        let mut old = module.clone();
        old.extend_from_slice(&noise(11, 200_000));
        let far = old.len() as i64;
        old.extend_from_slice(&new[1050..1050 + 2100]); // a copy that matches 2100 bytes
        let plain = diff(&old, &new, Matching::Bsdiff);
        let near = diff(&old, &new, Matching::Near);
        assert_eq!(apply(&old, &plain, new.len()), new);
        assert_eq!(apply(&old, &near, new.len()), new);
        let in_module = |r: &(i64, i64)| r.0 >= 0 && r.0 + r.1 <= module.len() as i64;
        assert!(
            add_ranges(&plain).iter().any(|r| r.0 >= far),
            "plain bsdiff matching reads the far copy: {:?}",
            add_ranges(&plain)
        );
        assert!(
            add_ranges(&near).iter().all(in_module),
            "near matching stays in the module: {:?}",
            add_ranges(&near)
        );
    }

    /// A module lies 1 MB further on in the new image than in the old, with a relocation; a
    /// 5 % longer copy of its first bytes lies in another file. Neither bsdiff's rule nor near
    /// matching (the module is far from where the scan is) finds the module's own old bytes
    /// first; per-file matching does.
    #[test]
    fn per_file_matching_reads_the_file_own_old_version() {
        let module = noise(7, 8000);
        let mut new = noise(3, 1 << 20);
        let at = new.len();
        new.extend_from_slice(&module);
        new[at + 2000] ^= 0x55; // a relocation
        let mut old = module.clone();
        old.extend_from_slice(&noise(11, 200_000));
        let far = old.len() as i64;
        old.extend_from_slice(&new[at..at + 2100]); // matches 2100 bytes, the module 2000
        let files = [Pair {
            new: at as u64..new.len() as u64,
            old: vec![0..module.len() as u64],
        }];
        let in_module = |r: &(i64, i64)| r.0 >= 0 && r.0 + r.1 <= module.len() as i64;
        for m in [Matching::Bsdiff, Matching::Near] {
            let plain = diff(&old, &new, m);
            assert_eq!(apply(&old, &plain, new.len()), new);
            assert!(
                add_ranges(&plain).iter().any(|r| r.0 >= far),
                "{m:?} without the map reads the far copy: {:?}",
                add_ranges(&plain)
            );
            let per_file = diff_files(&old, &new, m, &files);
            assert_eq!(apply(&old, &per_file, new.len()), new);
            assert!(
                add_ranges(&per_file).iter().all(in_module),
                "{m:?} with the map stays in the module: {:?}",
                add_ranges(&per_file)
            );
        }
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Set(usize, u8),
        Insert(usize, Vec<u8>),
        Delete(usize, usize),
        CopyWithin(usize, usize, usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Set(p, b)),
            (any::<usize>(), prop::collection::vec(0u8..4, 0..64))
                .prop_map(|(p, v)| Edit::Insert(p, v)),
            (any::<usize>(), 0usize..200).prop_map(|(p, n)| Edit::Delete(p, n)),
            (any::<usize>(), any::<usize>(), 0usize..300)
                .prop_map(|(a, b, n)| Edit::CopyWithin(a, b, n)),
        ]
    }

    proptest! {
        /// Any source (a small alphabet, so matches are many and ambiguous), any edits of it
        /// and any file map (new ranges paired with one or two old ranges, right or wrong):
        /// both matching rules, with the map and without, give streams that rebuild the new
        /// bytes exactly. A failure prints the minimal source, edits and map, which replay it.
        #[test]
        fn any_edits_round_trip(
            old in prop::collection::vec(0u8..4, 0..3000),
            edits in prop::collection::vec(edit(), 0..12),
            map in prop::collection::vec((any::<usize>(), 0usize..800, any::<usize>(), 0usize..900, any::<bool>()), 0..6),
        ) {
            let mut new = old.clone();
            for e in edits {
                let at = |p: usize, v: &Vec<u8>| if v.is_empty() { 0 } else { p % v.len() };
                match e {
                    Edit::Set(p, b) => { if !new.is_empty() { let i = at(p, &new); new[i] = b; } }
                    Edit::Insert(p, v) => { let i = at(p, &new); new.splice(i..i, v); }
                    Edit::Delete(p, n) => { let i = at(p, &new); let j = (i + n).min(new.len()); new.drain(i..j); }
                    Edit::CopyWithin(a, b, n) => {
                        if !new.is_empty() {
                            let (a, b) = (at(a, &new), at(b, &new));
                            let n = n.min(new.len() - a).min(new.len() - b);
                            new.copy_within(a..a + n, b);
                        }
                    }
                }
            }
            let (nl, ol) = (new.len() as u64, old.len() as u64);
            let files = crate::update::sqfsmap::disjoint(map
                .iter()
                .map(|&(a, n, b, m, two)| {
                    let a = a as u64 % (nl + 1);
                    let b = b as u64 % (ol + 1);
                    let old_r = b..(b + m as u64).min(ol);
                    let mut olds = vec![old_r.clone()];
                    if two {
                        olds.push(old_r.start / 2..old_r.start);
                    }
                    Pair { new: a..(a + n as u64).min(nl), old: olds }
                })
                .collect());
            for m in [Matching::Bsdiff, Matching::Near] {
                let s = diff(&old, &new, m);
                prop_assert_eq!(apply(&old, &s, new.len()), new.clone(), "{:?}", m);
                let s = diff_files(&old, &new, m, &files);
                prop_assert_eq!(apply(&old, &s, new.len()), new.clone(), "{:?} with {:?}", m, files);
            }
        }
    }
}
