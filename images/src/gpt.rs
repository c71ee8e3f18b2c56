//! A GUID partition table, read and written whole: the protective MBR, both headers and both entry arrays, with
//! their CRCs. Enough for herd's disk layout (`USR-A`, `USR-B`, `STATE`) and for the A/B slot bookkeeping, which
//! lives in the partition attribute bits the way ChromeOS and Flatcar keep it (priority, tries left, successful).

use std::io::{Read, Seek, SeekFrom, Write};

/// Bytes per logical block. herd only writes 512-byte-sector layouts (virtio, SATA and NVMe disks all expose one).
pub const SECTOR: u64 = 512;
const ENTRIES: usize = 128;
const ENTRY_SIZE: usize = 128;
/// Sectors taken by the entry array (128 × 128 bytes).
const ENTRY_SECTORS: u64 = (ENTRIES * ENTRY_SIZE) as u64 / SECTOR;
/// Partitions start on 1 MiB boundaries.
pub const ALIGN: u64 = 2048;

/// The x86-64 `/usr` partition type of the Discoverable Partitions Specification.
pub const TYPE_USR: Guid = Guid(*b"\x0c\x68\x84\x84\x21\x95\xc6\x48\x9c\x11\xb0\x72\x06\x56\xf6\x9e");
/// The `/var` partition type of the Discoverable Partitions Specification.
pub const TYPE_VAR: Guid = Guid(*b"\x16\xb0\x21\x4d\x34\xb5\xc2\x45\xa9\xfb\x5c\x16\xe0\x91\xfd\x2d");

/// A GUID in its on-disk (mixed-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// A GUID derived from `seed` (so a layout written twice from the same inputs is byte-identical).
    pub fn derived(seed: &str) -> Guid {
        use sha2::{Digest, Sha256};
        let d = Sha256::digest(seed.as_bytes());
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        // Version 4 / RFC 4122 variant bits, in on-disk order (the version is in byte 7 of the mixed-endian form).
        b[7] = (b[7] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        Guid(b)
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-",
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9]
        )?;
        b[10..].iter().try_for_each(|x| write!(f, "{x:02x}"))
    }
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Type GUID.
    pub kind: Guid,
    /// Unique GUID.
    pub id: Guid,
    /// First sector.
    pub first: u64,
    /// Last sector (inclusive).
    pub last: u64,
    /// Attribute bits; 48-56 carry the slot state (see [`SlotFlags`]).
    pub attributes: u64,
    /// The partition name (`PARTLABEL`).
    pub name: String,
}

impl Partition {
    /// Byte offset of the partition on the disk.
    pub fn offset(&self) -> u64 {
        self.first * SECTOR
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        (self.last + 1 - self.first) * SECTOR
    }
}

/// A/B slot state in a partition's attribute bits (ChromeOS/Flatcar layout): priority in bits 48-51 (0 = never
/// boot), tries left in 52-55, successful in 56.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SlotFlags {
    /// Higher boots first; 0 means the slot is not bootable.
    pub priority: u8,
    /// Boots left before the slot counts as failed (only while not `successful`).
    pub tries: u8,
    /// Reached "healthy" once: boots without spending tries.
    pub successful: bool,
}

impl SlotFlags {
    /// Reads the bits.
    pub fn from_attributes(a: u64) -> SlotFlags {
        SlotFlags { priority: ((a >> 48) & 0xf) as u8, tries: ((a >> 52) & 0xf) as u8, successful: (a >> 56) & 1 == 1 }
    }

    /// Writes the bits into `a`, leaving the others.
    pub fn apply(self, a: u64) -> u64 {
        let cleared = a & !(0x1ff << 48);
        cleared
            | (u64::from(self.priority.min(15)) << 48)
            | (u64::from(self.tries.min(15)) << 52)
            | (u64::from(self.successful) << 56)
    }

    /// Whether this slot may be booted.
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }
}

/// A partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Disk GUID.
    pub disk: Guid,
    /// Sectors on the disk.
    pub sectors: u64,
    /// The partitions, in entry order.
    pub partitions: Vec<Partition>,
}

/// What is wrong with a disk's table.
#[derive(Debug, thiserror::Error)]
pub enum GptError {
    /// Neither header is valid.
    #[error("no valid GPT on the disk ({0})")]
    Invalid(String),
    /// The layout does not fit.
    #[error("{0}")]
    Layout(String),
    /// I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Table {
    /// First sector a partition may use.
    pub fn first_usable() -> u64 {
        2 + ENTRY_SECTORS
    }

    /// Last sector a partition may use.
    pub fn last_usable(&self) -> u64 {
        self.sectors - 2 - ENTRY_SECTORS
    }

    /// The partition named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }

    /// The partition named `name`, for changing.
    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut Partition> {
        self.partitions.iter_mut().find(|p| p.name == name)
    }

    /// Reads the table of `disk` (`sectors` long), from the primary header or, if that is damaged, the backup.
    pub fn read<D: Read + Seek>(disk: &mut D, sectors: u64) -> Result<Table, GptError> {
        match read_at(disk, 1, sectors) {
            Ok(t) => Ok(t),
            Err(primary) => read_at(disk, sectors - 1, sectors)
                .map_err(|backup| GptError::Invalid(format!("primary: {primary}; backup: {backup}"))),
        }
    }

    /// Writes the protective MBR, both entry arrays and both headers.
    pub fn write<D: Write + Seek>(&self, disk: &mut D) -> Result<(), GptError> {
        if self.partitions.len() > ENTRIES {
            return Err(GptError::Layout(format!("{} partitions; a GPT holds {ENTRIES}", self.partitions.len())));
        }
        let mut entries = vec![0u8; ENTRIES * ENTRY_SIZE];
        for (i, p) in self.partitions.iter().enumerate() {
            if p.first < Table::first_usable() || p.last > self.last_usable() || p.first > p.last {
                return Err(GptError::Layout(format!(
                    "partition {} ({}..{}) outside the usable sectors",
                    p.name, p.first, p.last
                )));
            }
            let e = &mut entries[i * ENTRY_SIZE..(i + 1) * ENTRY_SIZE];
            e[0..16].copy_from_slice(&p.kind.0);
            e[16..32].copy_from_slice(&p.id.0);
            e[32..40].copy_from_slice(&p.first.to_le_bytes());
            e[40..48].copy_from_slice(&p.last.to_le_bytes());
            e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
            let units: Vec<u16> = p.name.encode_utf16().collect();
            if units.len() > 36 {
                return Err(GptError::Layout(format!("partition name {:?} longer than 36 characters", p.name)));
            }
            for (j, u) in units.iter().enumerate() {
                e[56 + 2 * j..58 + 2 * j].copy_from_slice(&u.to_le_bytes());
            }
        }
        let entries_crc = crc32fast::hash(&entries);
        let backup_entries = self.sectors - 1 - ENTRY_SECTORS;

        let mut mbr = [0u8; 512];
        mbr[446 + 4] = 0xee;
        mbr[446 + 1..446 + 4].copy_from_slice(&[0, 2, 0]);
        mbr[446 + 5..446 + 8].copy_from_slice(&[0xff, 0xff, 0xff]);
        mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
        let mbr_len = u32::try_from(self.sectors - 1).unwrap_or(u32::MAX);
        mbr[446 + 12..446 + 16].copy_from_slice(&mbr_len.to_le_bytes());
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        disk.seek(SeekFrom::Start(0))?;
        disk.write_all(&mbr)?;

        let header = |own: u64, other: u64, entries_at: u64| {
            let mut h = [0u8; 512];
            h[0..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&own.to_le_bytes());
            h[32..40].copy_from_slice(&other.to_le_bytes());
            h[40..48].copy_from_slice(&Table::first_usable().to_le_bytes());
            h[48..56].copy_from_slice(&self.last_usable().to_le_bytes());
            h[56..72].copy_from_slice(&self.disk.0);
            h[72..80].copy_from_slice(&entries_at.to_le_bytes());
            h[80..84].copy_from_slice(&(ENTRIES as u32).to_le_bytes());
            h[84..88].copy_from_slice(&(ENTRY_SIZE as u32).to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32fast::hash(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let last = self.sectors - 1;
        for (own, other, entries_at) in [(1, last, 2), (last, 1, backup_entries)] {
            disk.seek(SeekFrom::Start(entries_at * SECTOR))?;
            disk.write_all(&entries)?;
            disk.seek(SeekFrom::Start(own * SECTOR))?;
            disk.write_all(&header(own, other, entries_at))?;
        }
        disk.flush()?;
        Ok(())
    }
}

fn read_at<D: Read + Seek>(disk: &mut D, lba: u64, sectors: u64) -> Result<Table, String> {
    let mut h = [0u8; 512];
    disk.seek(SeekFrom::Start(lba * SECTOR)).map_err(|e| e.to_string())?;
    disk.read_exact(&mut h).map_err(|e| e.to_string())?;
    if &h[0..8] != b"EFI PART" {
        return Err(format!("no GPT signature at sector {lba}"));
    }
    let le32 = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let le64 = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap_or_default());
    let size = le32(12) as usize;
    if !(92..=512).contains(&size) {
        return Err(format!("header size {size}"));
    }
    let mut check = h;
    check[16..20].fill(0);
    if crc32fast::hash(&check[..size]) != le32(16) {
        return Err(format!("header CRC mismatch at sector {lba}"));
    }
    let (count, esize) = (le32(80) as usize, le32(84) as usize);
    if esize < 128 || count == 0 || count * esize > 1 << 20 {
        return Err(format!("{count} entries of {esize} bytes"));
    }
    let mut entries = vec![0u8; count * esize];
    disk.seek(SeekFrom::Start(le64(72) * SECTOR)).map_err(|e| e.to_string())?;
    disk.read_exact(&mut entries).map_err(|e| e.to_string())?;
    if crc32fast::hash(&entries) != le32(88) {
        return Err("partition entries CRC mismatch".into());
    }
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&h[56..72]);
    let mut partitions = Vec::new();
    for e in entries.chunks(esize) {
        if e[0..16].iter().all(|b| *b == 0) {
            continue;
        }
        let g = |o: usize| {
            let mut b = [0u8; 16];
            b.copy_from_slice(&e[o..o + 16]);
            Guid(b)
        };
        let q = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or_default());
        let units: Vec<u16> =
            e[56..128].chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|u| *u != 0).collect();
        partitions.push(Partition {
            kind: g(0),
            id: g(16),
            first: q(32),
            last: q(40),
            attributes: q(48),
            name: String::from_utf16_lossy(&units),
        });
    }
    Ok(Table { disk: Guid(disk_guid), sectors, partitions })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::io::Cursor;

    fn table() -> Table {
        Table {
            disk: Guid::derived("disk"),
            sectors: 64 * 2048,
            partitions: vec![
                Partition {
                    kind: TYPE_USR,
                    id: Guid::derived("a"),
                    first: 2048,
                    last: 4095,
                    attributes: SlotFlags { priority: 2, tries: 0, successful: true }.apply(0),
                    name: "USR-A".into(),
                },
                Partition {
                    kind: TYPE_VAR,
                    id: Guid::derived("s"),
                    first: 4096,
                    last: 64 * 2048 - 40,
                    attributes: 0,
                    name: "STATE".into(),
                },
            ],
        }
    }

    #[test]
    fn a_written_table_reads_back_and_survives_a_damaged_primary_header() {
        let t = table();
        let mut disk = Cursor::new(vec![0u8; (t.sectors * SECTOR) as usize]);
        t.write(&mut disk).unwrap();
        assert_eq!(Table::read(&mut disk, t.sectors).unwrap(), t);
        disk.get_mut()[512 + 60] ^= 1;
        assert_eq!(Table::read(&mut disk, t.sectors).unwrap(), t, "the backup header answers");
        let len = disk.get_ref().len();
        disk.get_mut()[len - 512 + 60] ^= 1;
        assert!(Table::read(&mut disk, t.sectors).is_err());
    }

    #[test]
    fn slot_flags_round_trip_and_leave_other_bits_alone() {
        let f = SlotFlags { priority: 15, tries: 3, successful: false };
        let a = f.apply(1);
        assert_eq!(a & 1, 1);
        assert_eq!(SlotFlags::from_attributes(a), f);
        assert!(f.bootable());
        assert!(!SlotFlags { priority: 1, tries: 0, successful: false }.bootable());
        assert!(!SlotFlags { priority: 0, tries: 3, successful: true }.bootable());
    }

    #[test]
    fn the_usr_type_prints_as_the_specification_writes_it() {
        assert_eq!(format!("{TYPE_USR:?}"), "8484680c-9521-48c6-9c11-b0720656f69e");
        assert_eq!(format!("{TYPE_VAR:?}"), "4d21b016-b534-45c2-a9fb-5c16e091fd2d");
    }
}
