use super::*;
use crate::block::MemDevice;

pub(crate) fn small_spec() -> LayoutSpec {
    LayoutSpec {
        esp_size: MIB,
        root_size: 2 * MIB,
        state_size: Some(MIB),
    }
}

#[test]
fn create_then_open_finds_four_partitions_in_order() {
    for ss in [512u64, 4096] {
        let mut dev = MemDevice::new(8 * MIB, ss);
        create(&mut dev, small_spec()).unwrap();
        let l = open(&dev).unwrap();
        assert_eq!(l.table.repair, table::Repair::None, "ss={ss}");
        let parts = [&l.esp, &l.root_a, &l.root_b, &l.state];
        let labels: Vec<_> = parts.iter().map(|p| p.label).collect();
        assert_eq!(labels, LABELS);
        assert_eq!(l.esp.offset, MIB);
        for p in parts {
            assert_eq!(p.offset % MIB, 0, "{} not 1 MiB aligned", p.label);
        }
        assert_eq!(l.root_a.len, 2 * MIB);
        assert_eq!(l.root_b.offset, l.root_a.offset + 2 * MIB);
        assert_eq!(l.esp.type_guid, types::EFI_SYSTEM);
        assert_eq!(l.root_a.type_guid, types::LINUX_ROOT_X86_64);
        assert_eq!(l.root_b.type_guid, types::LINUX_ROOT_X86_64);
        assert_eq!(l.state.type_guid, types::LINUX_FILESYSTEM);
        assert_eq!(l.root_a.attributes, 0);
        assert_eq!(l.root_b.attributes, 0);
    }
}

#[test]
fn state_takes_the_rest_when_unsized() {
    let mut dev = MemDevice::new(16 * MIB, 512);
    let spec = LayoutSpec {
        state_size: None,
        ..small_spec()
    };
    create(&mut dev, spec).unwrap();
    let l = open(&dev).unwrap();
    assert_eq!(l.state.offset, 6 * MIB);
    assert!(l.state.len >= 9 * MIB, "{}", l.state.len);
}

#[test]
fn layout_that_does_not_fit_is_refused_before_writing() {
    let mut dev = MemDevice::new(4 * MIB, 512);
    let err = create(&mut dev, small_spec()).unwrap_err();
    assert!(matches!(err, DiskError::DoesNotFit { .. }), "{err}");
    assert!(dev.bytes().iter().all(|b| *b == 0));
    let err = create(
        &mut dev,
        LayoutSpec {
            root_size: 0,
            ..small_spec()
        },
    )
    .unwrap_err();
    assert!(matches!(err, DiskError::EmptyPartition { .. }), "{err}");
}

#[test]
fn not_a_disk_is_a_clear_error() {
    let dev = MemDevice::from_bytes((0..4 * MIB).map(|i| (i * 7 % 251) as u8).collect(), 512);
    let msg = open(&dev).unwrap_err().to_string();
    assert!(msg.contains("no valid GPT"), "{msg}");
    assert!(msg.contains("primary") && msg.contains("backup"), "{msg}");
    let tiny = MemDevice::new(512, 512);
    assert!(open(&tiny).unwrap_err().to_string().contains("too small"));
}

fn rename_entry(dev: &mut MemDevice, index: u32, name: &str) {
    let t = table::read(dev).unwrap();
    let mut array = t.copy.array.clone();
    let o = index as usize * 128 + 56;
    array[o..o + 72].fill(0);
    for (i, u) in name.encode_utf16().enumerate() {
        array[o + 2 * i..o + 2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    table::write_array(dev, &t, &array).unwrap();
}

#[test]
fn missing_and_duplicate_labels_are_named() {
    let mut dev = MemDevice::new(8 * MIB, 512);
    create(&mut dev, small_spec()).unwrap();
    rename_entry(&mut dev, 2, "SOMETHING_ELSE");
    let err = open(&dev).unwrap_err();
    assert!(matches!(err, DiskError::MissingLabel(ROOT_B)), "{err}");
    assert!(err.to_string().contains("MATIC_ROOT_B"));
    rename_entry(&mut dev, 2, ROOT_A);
    let err = open(&dev).unwrap_err();
    assert!(
        matches!(
            err,
            DiskError::DuplicateLabel {
                label: ROOT_A,
                count: 2
            }
        ),
        "{err}"
    );
}

#[test]
fn truncated_image_is_named() {
    let mut dev = MemDevice::new(8 * MIB, 512);
    create(&mut dev, small_spec()).unwrap();
    let mut bytes = dev.into_bytes();
    bytes.truncate(5 * MIB as usize);
    let msg = open(&MemDevice::from_bytes(bytes, 512))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("truncated"), "{msg}");
}

/// Flip one byte of the primary or backup copy: the other copy is used and the damaged one is
/// repaired, and no byte inside a partition changes.
#[test]
fn corrupt_copy_is_read_around_and_repaired() {
    for ss in [512u64, 4096] {
        let mut clean = MemDevice::new(8 * MIB, ss);
        create(&mut clean, small_spec()).unwrap();
        let total = clean.len() / ss;
        // header CRC byte, and a byte in the array, of each copy
        let primary_array = 2 * ss;
        let backup_header = (total - 1) * ss;
        let backup_array = backup_header - 128 * 128;
        for (at, which) in [
            (ss + 16, table::Which::Primary),
            (primary_array + 40, table::Which::Primary),
            (backup_header + 16, table::Which::Backup),
            (backup_array + 300, table::Which::Backup),
        ] {
            let mut dev = clean.clone();
            let mut b = [0u8; 1];
            dev.read_at(at, &mut b).unwrap();
            dev.write_at(at, &[b[0] ^ 0xFF]).unwrap();
            let t = table::read(&dev).unwrap();
            assert!(
                matches!(&t.repair, table::Repair::Rebuild(w, _) if *w == which),
                "ss={ss} at={at}: {:?}",
                t.repair
            );
            let before = open(&dev).unwrap();
            table::repair(&mut dev, &t).unwrap();
            assert_eq!(
                dev.bytes(),
                clean.bytes(),
                "ss={ss} at={at}: repair is exact"
            );
            assert_eq!(open(&dev).unwrap().table.repair, table::Repair::None);
            assert_eq!(before.root_a, open(&dev).unwrap().root_a);
        }
    }
}
