//! The disk of an installed node: GPT partitions `USR-A` and `USR-B` (one image each) and `STATE` (ext4: the
//! upper layers of `/etc` and `/var`), plus the A/B bookkeeping in the slots' attribute bits.
//!
//! A slot holds `root.squashfs` from its first byte, the dm-verity hash device (superblock + tree) right after it,
//! and a [`SlotHeader`] in its last 4 KiB that says where things are. The header is not trusted: the root hash that
//! unlocks a slot comes from the kernel command line (the boot server's word), and a header that lies only makes
//! verity refuse the slot.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::build::ImageManifest;
use crate::gpt::{self, Guid, Partition, SECTOR, SlotFlags, Table};

/// Bytes at the end of a slot holding its header.
pub const HEADER_BYTES: u64 = 4096;
/// The header's magic.
pub const MAGIC: &str = "herd-slot/1";
/// Default size of each `USR-*` partition.
pub const DEFAULT_SLOT_BYTES: u64 = 1536 << 20;
/// The smallest STATE partition install accepts.
pub const MIN_STATE_BYTES: u64 = 256 << 20;

/// One of the two image slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// `USR-A`.
    A,
    /// `USR-B`.
    B,
}

impl Slot {
    /// Both, in order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The partition name.
    pub fn label(self) -> &'static str {
        match self {
            Slot::A => "USR-A",
            Slot::B => "USR-B",
        }
    }

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `a` or `b`.
    pub fn letter(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

impl std::str::FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Slot, String> {
        match s.to_ascii_lowercase().as_str() {
            "a" | "usr-a" => Ok(Slot::A),
            "b" | "usr-b" => Ok(Slot::B),
            _ => Err(format!("{s:?} is not a slot; use a or b")),
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.letter())
    }
}

/// Where the pieces of an image sit inside its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotHeader {
    /// [`MAGIC`].
    pub magic: String,
    /// Image name.
    pub name: String,
    /// Image release.
    pub release: String,
    /// The image's build key.
    pub key: String,
    /// The kernel the image's modules are for (`uname -r`).
    pub kernel_version: String,
    /// The verity root hash of the data.
    pub root_hash: String,
    /// Bytes of squashfs data from the slot's start (a multiple of 4096).
    pub data_bytes: u64,
    /// Where the verity hash device (its superblock) starts, from the slot's start.
    pub hash_offset: u64,
}

impl SlotHeader {
    /// Parses a header block (JSON, NUL padded).
    pub fn parse(block: &[u8]) -> Option<SlotHeader> {
        let end = block.iter().position(|b| *b == 0).unwrap_or(block.len());
        let h: SlotHeader = serde_json::from_slice(&block[..end]).ok()?;
        (h.magic == MAGIC).then_some(h)
    }
}

/// A slot's state as read from the disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// Which.
    pub slot: Slot,
    /// Its bookkeeping bits.
    pub flags: SlotFlags,
    /// What it holds, if anything.
    pub header: Option<SlotHeader>,
    /// Byte offset of the partition.
    pub offset: u64,
    /// Partition size.
    pub size: u64,
}

/// A machine's slot table as node-init reports it to the provisioner (phone-home `configured` and `healthy`): the
/// disk, the slot it booted, and both slots' flags and contents. The provisioner keeps the last one per machine
/// and boots the machine with the kernel of the slot it will pick, trusting the root hashes of its slots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotReport {
    /// The disk, e.g. `/dev/vda`.
    pub disk: String,
    /// The slot this boot runs.
    pub booted: Slot,
    /// Both slots as the disk has them now.
    pub slots: Vec<SlotState>,
}

impl SlotReport {
    /// The slot the machine's next boot picks (as node-init's initramfs does), and what it holds.
    pub fn next(&self) -> Option<&SlotState> {
        let first = *boot_order(&self.slots).first()?;
        self.slots.iter().find(|s| s.slot == first)
    }

    /// Checks a report that crossed the network before it is stored or written into anything (the next boot's
    /// script names the slot's image): a device path, both slots at most once each, and headers whose every field
    /// is of its form (a 64-hex-digit root hash, names from [`is_safe_word`]'s set, offsets inside the slot).
    pub fn check(&self) -> Result<(), ReportError> {
        let bad = |at: String, why: &'static str| Err(ReportError { at, why });
        let disk_ok = self.disk.len() <= 64
            && self
                .disk
                .strip_prefix("/dev/")
                .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b)))
            && !self.disk.contains("..");
        if !disk_ok {
            return bad("disk".into(), "a device path under /dev/ (letters, digits, / _ -), at most 64 characters");
        }
        if self.slots.len() > Slot::ALL.len() {
            return bad("slots".into(), "at most two slots");
        }
        for (i, s) in self.slots.iter().enumerate() {
            if self.slots[..i].iter().any(|o| o.slot == s.slot) {
                return bad(format!("slots[{i}].slot"), "each slot at most once");
            }
            let Some(h) = &s.header else { continue };
            let at = |field: &str| format!("slots[{i}].header.{field}");
            if h.magic != MAGIC {
                return bad(at("magic"), "not herd-slot/1");
            }
            for (field, value) in [("name", &h.name), ("release", &h.release), ("kernel_version", &h.kernel_version)] {
                if !is_safe_word(value) {
                    return bad(at(field), "1-64 characters of A-Z a-z 0-9 . _ + ~ : -");
                }
            }
            if !is_root_hash(&h.root_hash) {
                return bad(at("root_hash"), "64 lower-case hex digits");
            }
            if h.key.len() > 128 || !h.key.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return bad(at("key"), "at most 128 letters and digits");
            }
            if h.data_bytes > s.size || h.hash_offset > s.size {
                return bad(at("hash_offset"), "inside the slot");
            }
        }
        if !self.slots.iter().any(|s| s.slot == self.booted) && !self.slots.is_empty() {
            return bad("booted".into(), "one of the reported slots");
        }
        Ok(())
    }
}

/// A field of a slot report that is not of its form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {why}")]
pub struct ReportError {
    /// The field, as a JSON path (`slots[0].header.release`).
    pub at: String,
    /// What it must be.
    pub why: &'static str,
}

/// An image name, release or kernel version as herd writes it anywhere (a slot header, an iPXE comment, a file
/// name): 1-64 characters of `A-Z a-z 0-9 . _ + ~ : -`.
pub fn is_safe_word(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+~:-".contains(&b))
}

/// A dm-verity root hash as herd writes it: 64 lower-case hex digits.
pub fn is_root_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A failed disk operation.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// GPT trouble.
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    /// The disk is not laid out for herd.
    #[error("{0}")]
    Layout(String),
    /// The image directory is incomplete.
    #[error("{0}")]
    Image(String),
    /// A tool failed.
    #[error("{0}")]
    Tool(String),
    /// I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Size in bytes of a disk image file or block device.
pub fn disk_size(f: &mut File) -> std::io::Result<u64> {
    f.seek(SeekFrom::End(0))
}

/// A fresh herd layout for a disk of `bytes`: `USR-A`, `USR-B` of `slot_bytes` each, `STATE` taking the rest.
pub fn layout(bytes: u64, slot_bytes: u64, seed: &str) -> Result<Table, SlotError> {
    let sectors = bytes / SECTOR;
    let slot_sectors = slot_bytes.div_ceil(SECTOR).div_ceil(gpt::ALIGN) * gpt::ALIGN;
    let mut table = Table { disk: Guid::derived(&format!("{seed}/disk")), sectors, partitions: Vec::new() };
    let last_usable = if sectors > 2 + 33 { table.last_usable() } else { 0 };
    let state_first = gpt::ALIGN + 2 * slot_sectors;
    // STATE ends on an alignment boundary too (so its size is whole MiB).
    let state_last = (last_usable + 1) / gpt::ALIGN * gpt::ALIGN - 1;
    if state_last <= state_first || (state_last + 1 - state_first) * SECTOR < MIN_STATE_BYTES {
        return Err(SlotError::Layout(format!(
            "a {} MiB disk is too small for two {} MiB slots and a {} MiB STATE partition",
            bytes >> 20,
            slot_bytes >> 20,
            MIN_STATE_BYTES >> 20
        )));
    }
    for (i, slot) in Slot::ALL.iter().enumerate() {
        let first = gpt::ALIGN + i as u64 * slot_sectors;
        table.partitions.push(Partition {
            kind: gpt::TYPE_USR,
            id: Guid::derived(&format!("{seed}/{}", slot.label())),
            first,
            last: first + slot_sectors - 1,
            attributes: 0,
            name: slot.label().into(),
        });
    }
    table.partitions.push(Partition {
        kind: gpt::TYPE_VAR,
        id: Guid::derived(&format!("{seed}/STATE")),
        first: state_first,
        last: state_last,
        attributes: 0,
        name: "STATE".into(),
    });
    Ok(table)
}

/// Reads the table and both slots of an open disk.
pub fn read_slots(disk: &mut File) -> Result<(Table, Vec<SlotState>), SlotError> {
    let size = disk_size(disk)?;
    let table = Table::read(disk, size / SECTOR)?;
    let mut slots = Vec::new();
    for slot in Slot::ALL {
        let p = table.by_name(slot.label()).ok_or_else(|| {
            SlotError::Layout(format!("the disk has no {} partition; install an image first", slot.label()))
        })?;
        let mut block = vec![0u8; HEADER_BYTES as usize];
        disk.seek(SeekFrom::Start(p.offset() + p.size() - HEADER_BYTES))?;
        disk.read_exact(&mut block)?;
        slots.push(SlotState {
            slot,
            flags: SlotFlags::from_attributes(p.attributes),
            header: SlotHeader::parse(&block),
            offset: p.offset(),
            size: p.size(),
        });
    }
    Ok((table, slots))
}

fn set_flags(table: &mut Table, slot: Slot, flags: SlotFlags) {
    if let Some(p) = table.by_name_mut(slot.label()) {
        p.attributes = flags.apply(p.attributes);
    }
}

/// Marks `slot` to be tried once on the next boot, ahead of the other.
pub fn mark_try(table: &mut Table, slot: Slot) {
    let other = table.by_name(slot.other().label()).map(|p| SlotFlags::from_attributes(p.attributes));
    let other = other.unwrap_or_default();
    if other.priority >= 2 {
        set_flags(table, slot.other(), SlotFlags { priority: 1, ..other });
    }
    set_flags(table, slot, SlotFlags { priority: 2, tries: 1, successful: false });
}

/// Marks `slot` good: it boots from now on, the other stays as the fallback.
pub fn mark_good(table: &mut Table, slot: Slot) {
    let other = table.by_name(slot.other().label()).map(|p| SlotFlags::from_attributes(p.attributes));
    if let Some(other) = other.filter(|o| o.priority > 0) {
        set_flags(table, slot.other(), SlotFlags { priority: 1, ..other });
    }
    set_flags(table, slot, SlotFlags { priority: 2, tries: 0, successful: true });
}

/// Marks `slot` not bootable (it failed verification or never became healthy).
pub fn mark_bad(table: &mut Table, slot: Slot) {
    set_flags(table, slot, SlotFlags { priority: 0, tries: 0, successful: false });
}

/// Spends one try of `slot` (before booting it while it is not yet successful).
pub fn spend_try(table: &mut Table, slot: Slot) {
    if let Some(p) = table.by_name(slot.label()) {
        let f = SlotFlags::from_attributes(p.attributes);
        if !f.successful {
            set_flags(table, slot, SlotFlags { tries: f.tries.saturating_sub(1), ..f });
        }
    }
}

/// The slots to boot, best first: bootable ones by priority (then A before B).
pub fn boot_order(slots: &[SlotState]) -> Vec<Slot> {
    let mut ok: Vec<&SlotState> = slots.iter().filter(|s| s.flags.bootable() && s.header.is_some()).collect();
    ok.sort_by_key(|s| (std::cmp::Reverse(s.flags.priority), s.slot));
    ok.into_iter().map(|s| s.slot).collect()
}

/// What `install` did.
#[derive(Debug, Clone, Serialize)]
pub struct Installed {
    /// The slot written.
    pub slot: Slot,
    /// Its header.
    pub header: SlotHeader,
    /// Whether the disk was partitioned (and STATE formatted) by this call.
    pub partitioned: bool,
    /// The slot's flags afterwards.
    pub flags: SlotFlags,
}

/// An image to write into a slot, as streams (files of a build directory, or HTTP bodies in the installer).
pub struct ImageStreams<'a> {
    /// Its description.
    pub manifest: ImageManifest,
    /// `root.squashfs` and its length.
    pub squash: (Box<dyn Read + 'a>, u64),
    /// `root.verity` and its length.
    pub verity: (Box<dyn Read + 'a>, u64),
}

impl std::fmt::Debug for ImageStreams<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStreams").field("image", &self.manifest.key).finish_non_exhaustive()
    }
}

/// How `install_streams` treats the disk's existing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Keep herd's layout if there is one, partition an empty disk, refuse a foreign table.
    Keep,
    /// Partition afresh whatever is there (the installer reprovisioning a machine).
    Fresh,
}

/// Writes the image in `image_dir` (the output of `herdctl image build`) into `slot` of `disk`, partitioning the
/// disk and formatting STATE first if it has no herd layout. If the other slot is bootable, the new one is marked
/// to try once; otherwise it becomes the good slot.
pub fn install(disk_path: &Path, slot: Slot, image_dir: &Path, slot_bytes: u64) -> Result<Installed, SlotError> {
    let text = std::fs::read_to_string(image_dir.join("manifest.json")).map_err(|e| {
        SlotError::Image(format!("{}: {e}; build the image first (herdctl image build)", image_dir.display()))
    })?;
    let manifest: ImageManifest = serde_json::from_str(&text)
        .map_err(|e| SlotError::Image(format!("{}/manifest.json: {e}", image_dir.display())))?;
    let open = |name: &str| -> Result<(Box<dyn Read>, u64), SlotError> {
        let f = File::open(image_dir.join(name))?;
        let len = f.metadata()?.len();
        Ok((Box::new(f), len))
    };
    let streams = ImageStreams { manifest, squash: open("root.squashfs")?, verity: open("root.verity")? };
    let installed = install_streams(disk_path, slot, streams, slot_bytes, Layout::Keep)?;
    if installed.partitioned {
        let mut disk = File::open(disk_path)?;
        let size = disk_size(&mut disk)?;
        let table = Table::read(&mut disk, size / SECTOR)?;
        let state = table.by_name("STATE").cloned().ok_or_else(|| SlotError::Layout("no STATE".into()))?;
        format_state(disk_path, &state)?;
    }
    Ok(installed)
}

/// Writes an image given as streams into `slot` of `disk`. With a fresh layout (or an empty disk) the disk is
/// partitioned; STATE is then left unformatted (the caller formats it). The slot's header is written last.
pub fn install_streams(
    disk_path: &Path,
    slot: Slot,
    image: ImageStreams<'_>,
    slot_bytes: u64,
    mode: Layout,
) -> Result<Installed, SlotError> {
    let ImageStreams { manifest: image, squash: (mut squash, squash_len), verity: (mut verity, verity_len) } = image;
    if !squash_len.is_multiple_of(4096) {
        return Err(SlotError::Image(format!("root.squashfs is {squash_len} bytes, not a multiple of 4096")));
    }
    let mut disk = OpenOptions::new().read(true).write(true).open(disk_path).map_err(|e| {
        SlotError::Layout(format!("{}: {e} (create a disk first, e.g. truncate -s 4G FILE)", disk_path.display()))
    })?;
    let size = disk_size(&mut disk)?;
    let existing = match mode {
        Layout::Keep => Table::read(&mut disk, size / SECTOR).ok(),
        Layout::Fresh => None,
    };
    let (mut table, partitioned) = match existing {
        Some(t) if t.by_name("USR-A").is_some() && t.by_name("USR-B").is_some() && t.by_name("STATE").is_some() => {
            (t, false)
        }
        Some(_) => {
            return Err(SlotError::Layout(format!(
                "{} has a partition table that is not herd's (no USR-A/USR-B/STATE); refusing to overwrite it — \
                 wipe it first (wipefs -a) if it may go",
                disk_path.display()
            )));
        }
        None => {
            let t = layout(size, slot_bytes, &format!("{}:{}", disk_path.display(), image.key))?;
            t.write(&mut disk)?;
            (t, true)
        }
    };
    let part = table.by_name(slot.label()).cloned().ok_or_else(|| SlotError::Layout("no slot".into()))?;
    let hash_offset = squash_len;
    if hash_offset + verity_len + HEADER_BYTES > part.size() {
        return Err(SlotError::Layout(format!(
            "the image needs {} MiB; slot {} has {} MiB",
            (hash_offset + verity_len + HEADER_BYTES) >> 20,
            slot.label(),
            part.size() >> 20
        )));
    }
    // The header goes first (invalidated) so a half-written slot never looks complete.
    disk.seek(SeekFrom::Start(part.offset() + part.size() - HEADER_BYTES))?;
    disk.write_all(&[0u8; HEADER_BYTES as usize])?;
    disk.sync_data()?;
    copy_exact(&mut squash, squash_len, &mut disk, part.offset(), "root.squashfs")?;
    copy_exact(&mut verity, verity_len, &mut disk, part.offset() + hash_offset, "root.verity")?;
    let header = SlotHeader {
        magic: MAGIC.into(),
        name: image.name.clone(),
        release: image.release.clone(),
        key: image.key.clone(),
        kernel_version: image.kernel.version.clone(),
        root_hash: image.verity.root_hash.clone(),
        data_bytes: squash_len,
        hash_offset,
    };
    let mut block = serde_json::to_vec(&header).map_err(|e| SlotError::Image(e.to_string()))?;
    block.resize(HEADER_BYTES as usize, 0);
    disk.sync_data()?;
    disk.seek(SeekFrom::Start(part.offset() + part.size() - HEADER_BYTES))?;
    disk.write_all(&block)?;
    disk.sync_data()?;

    let other = table.by_name(slot.other().label()).map(|p| SlotFlags::from_attributes(p.attributes));
    if other.is_some_and(SlotFlags::bootable) {
        mark_try(&mut table, slot);
    } else {
        mark_good(&mut table, slot);
    }
    table.write(&mut disk)?;
    disk.sync_all()?;
    let flags = table.by_name(slot.label()).map(|p| SlotFlags::from_attributes(p.attributes)).unwrap_or_default();
    Ok(Installed { slot, header, partitioned, flags })
}

/// Copies exactly `len` bytes from `src` to `disk` at `at`, in writes of up to 1 MiB (std's copy writes 8 KiB at
/// a time: 24,000 system calls for a 188 MiB root, which an emulated CPU feels).
fn copy_exact(src: &mut dyn Read, len: u64, disk: &mut File, at: u64, what: &str) -> Result<(), SlotError> {
    disk.seek(SeekFrom::Start(at))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut copied = 0u64;
    while copied < len {
        let want = (len - copied).min(COPY_CHUNK as u64) as usize;
        // Fill the buffer (an HTTP body hands out a few KiB per read) before one write.
        let mut filled = 0;
        while filled < want {
            match src.read(&mut buf[filled..want]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        if filled == 0 {
            break;
        }
        disk.write_all(&buf[..filled])?;
        copied += filled as u64;
    }
    if copied != len {
        return Err(SlotError::Image(format!("{what}: got {copied} of {len} bytes")));
    }
    Ok(())
}

/// The size of the writes that put an image into a slot.
const COPY_CHUNK: usize = 1 << 20;

/// Makes the ext4 STATE file system inside the partition (by offset, so it works on image files and on a whole
/// block device whose partitions the kernel has not re-read yet).
fn format_state(disk: &Path, p: &Partition) -> Result<(), SlotError> {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "STATE", "-E"])
        .arg(format!("offset={}", p.offset()))
        .arg(disk)
        .arg(format!("{}k", p.size() / 1024))
        .output()
        .map_err(|e| SlotError::Tool(format!("mkfs.ext4: {e} (install e2fsprogs)")))?;
    if !out.status.success() {
        return Err(SlotError::Tool(format!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// Whether `path` is a qcow2 image (magic `QFI\xfb`).
pub fn is_qcow2(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && magic == *b"QFI\xfb"
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), SlotError> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .map_err(|e| SlotError::Tool(format!("qemu-img: {e} (install qemu-utils)")))?;
    if !out.status.success() {
        return Err(SlotError::Tool(format!("qemu-img failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// Runs `f` on the disk as a raw file: a raw file or block device directly; a qcow2 image through a sparse raw
/// copy that replaces the original (converted back) only if `f` succeeded.
pub fn on_raw<T>(path: &Path, f: impl FnOnce(&Path) -> Result<T, SlotError>) -> Result<T, SlotError> {
    if !is_qcow2(path) {
        return f(path);
    }
    let raw = path.with_extension("herd-raw.tmp");
    let back = path.with_extension("herd-qcow2.tmp");
    let os = |p: &Path| p.as_os_str().to_owned();
    let run = || -> Result<T, SlotError> {
        qemu_img(&["convert".as_ref(), "-O".as_ref(), "raw".as_ref(), &os(path), &os(&raw)])?;
        let value = f(&raw)?;
        qemu_img(&["convert".as_ref(), "-O".as_ref(), "qcow2".as_ref(), &os(&raw), &os(&back)])?;
        std::fs::rename(&back, path)?;
        Ok(value)
    };
    let result = run();
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_file(&back);
    result
}

/// Opens a disk, applies `change` to its table, writes it back; returns the slots afterwards.
pub fn update(disk_path: &Path, change: impl FnOnce(&mut Table)) -> Result<Vec<SlotState>, SlotError> {
    let mut disk = OpenOptions::new().read(true).write(true).open(disk_path)?;
    let (mut table, _) = read_slots(&mut disk)?;
    change(&mut table);
    table.write(&mut disk)?;
    disk.sync_all()?;
    Ok(read_slots(&mut disk)?.1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn state(slot: Slot, flags: SlotFlags) -> SlotState {
        let header = SlotHeader {
            magic: MAGIC.into(),
            name: "n".into(),
            release: "r".into(),
            key: "k".into(),
            kernel_version: "v".into(),
            root_hash: "h".into(),
            data_bytes: 4096,
            hash_offset: 4096,
        };
        SlotState { slot, flags, header: Some(header), offset: 0, size: 0 }
    }

    #[test]
    fn a_reported_slot_table_is_checked_field_by_field_before_anything_keeps_it() {
        let good = || {
            let mut a = state(Slot::A, SlotFlags { priority: 2, tries: 0, successful: true });
            let h = a.header.as_mut().unwrap();
            (h.name, h.release, h.key) = ("herd-os".into(), "2026.11.0".into(), "0123abcd".into());
            (h.kernel_version, h.root_hash) = ("6.12.95+deb12-amd64".into(), "ab".repeat(32));
            a.size = 1 << 30;
            let b = SlotState { header: None, ..state(Slot::B, SlotFlags::default()) };
            SlotReport { disk: "/dev/nvme0n1".into(), booted: Slot::A, slots: vec![a, b] }
        };
        good().check().unwrap();
        type Spoil = fn(&mut SlotReport);
        let cases: [(&str, Spoil); 9] = [
            ("disk", |r| r.disk = "/etc/passwd".into()),
            ("disk", |r| r.disk = "/dev/../etc".into()),
            ("slots[0].header.release", |r| r.slots[0].header.as_mut().unwrap().release = "1\nshell".into()),
            ("slots[0].header.name", |r| r.slots[0].header.as_mut().unwrap().name = "x".repeat(65)),
            ("slots[0].header.root_hash", |r| r.slots[0].header.as_mut().unwrap().root_hash = "AB".repeat(32)),
            ("slots[0].header.kernel_version", |r| r.slots[0].header.as_mut().unwrap().kernel_version = "".into()),
            ("slots[0].header.hash_offset", |r| r.slots[0].header.as_mut().unwrap().hash_offset = 2 << 30),
            ("slots[1].slot", |r| r.slots[1].slot = Slot::A),
            ("slots", |r| r.slots.push(r.slots[0].clone())),
        ];
        for (at, spoil) in cases {
            let mut r = good();
            spoil(&mut r);
            assert_eq!(r.check().unwrap_err().at, at);
        }
    }

    #[test]
    fn the_layout_aligns_partitions_and_refuses_small_disks() {
        let t = layout(4 << 30, DEFAULT_SLOT_BYTES, "x").unwrap();
        let names: Vec<&str> = t.partitions.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["USR-A", "USR-B", "STATE"]);
        for p in &t.partitions {
            assert_eq!(p.first % gpt::ALIGN, 0, "{}", p.name);
            assert_eq!((p.last + 1) % gpt::ALIGN, 0, "{}", p.name);
        }
        assert_eq!(t.partitions[0].size(), DEFAULT_SLOT_BYTES);
        let err = layout(2 << 30, DEFAULT_SLOT_BYTES, "x").unwrap_err().to_string();
        assert!(err.contains("too small"), "{err}");
    }

    #[test]
    fn a_tried_slot_boots_first_once_then_the_good_one_again() {
        let mut t = layout(4 << 30, DEFAULT_SLOT_BYTES, "x").unwrap();
        mark_good(&mut t, Slot::A);
        mark_try(&mut t, Slot::B);
        let flags = |t: &Table, s: Slot| SlotFlags::from_attributes(t.by_name(s.label()).unwrap().attributes);
        let order = |t: &Table| boot_order(&Slot::ALL.map(|s| state(s, flags(t, s))));
        assert_eq!(order(&t), [Slot::B, Slot::A]);
        spend_try(&mut t, Slot::B);
        assert_eq!(order(&t), [Slot::A], "B had one try");
        mark_good(&mut t, Slot::B);
        assert_eq!(order(&t), [Slot::B, Slot::A]);
        mark_bad(&mut t, Slot::B);
        assert_eq!(order(&t), [Slot::A]);
    }

    /// Hands out at most 3000 bytes per read, as an HTTP body does.
    struct Dribble<'a>(&'a [u8]);

    impl Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(3000);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_slot_gets_exactly_the_streamed_bytes_at_its_offset_and_a_short_stream_is_refused() {
        let path = std::env::temp_dir().join(format!("herd-copy-exact-{}", std::process::id()));
        let mut disk = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        // Over two chunks, not a multiple of one, and not of the reads' size.
        let data: Vec<u8> = (0..COPY_CHUNK * 2 + 12_345).map(|i| (i * 7 % 251) as u8).collect();
        copy_exact(&mut Dribble(&data), data.len() as u64, &mut disk, 4096, "root.squashfs").unwrap();
        let written = std::fs::read(&path).unwrap();
        assert_eq!(written.len(), 4096 + data.len());
        assert!(written[..4096].iter().all(|b| *b == 0));
        assert!(written[4096..] == data[..], "the slot's bytes differ from the stream's");
        let err = copy_exact(&mut Dribble(&data[..1000]), 5000, &mut disk, 0, "root.verity").unwrap_err();
        assert!(err.to_string().contains("root.verity: got 1000 of 5000 bytes"), "{err}");
        let _ = std::fs::remove_file(&path);
    }
}
