//! dm-verity from userland with the device-mapper ioctls (Debian kernels have no `dm-mod.create=`): create a
//! device, load one `verity` target, resume it. The only unsafe code of node-init is the `ioctl` call below.
#![allow(unsafe_code)]

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// `sizeof(struct dm_ioctl)`.
const DM_IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
const DM_TARGET_SPEC_SIZE: usize = 40;
const DM_DEV_CREATE: u8 = 3;
const DM_DEV_REMOVE: u8 = 4;
const DM_DEV_SUSPEND: u8 = 6;
const DM_TABLE_LOAD: u8 = 9;
const DM_READONLY_FLAG: u32 = 1;

/// Why a verity device could not be made.
pub type DmError = crate::error::SysError;

/// The verity superblock `veritysetup format` writes at the start of the hash device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VeritySuperblock {
    /// Hash algorithm (e.g. `sha256`).
    pub algorithm: String,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Number of data blocks.
    pub data_blocks: u64,
    /// Salt, hex.
    pub salt: String,
    /// Hash type (1 = the normal format).
    pub hash_type: u32,
}

impl VeritySuperblock {
    /// Parses the 512-byte superblock.
    pub fn parse(b: &[u8]) -> Result<VeritySuperblock, DmError> {
        if b.len() < 512 || &b[..8] != b"verity\0\0" {
            return Err(DmError::Invalid("no verity superblock where the hash tree should start".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let algorithm: String = b[32..64].iter().take_while(|c| **c != 0).map(|c| *c as char).collect();
        let salt_size = u16::from_le_bytes([b[80], b[81]]) as usize;
        if salt_size > 256 || !algorithm.chars().all(|c| c.is_ascii_alphanumeric()) || algorithm.is_empty() {
            return Err(DmError::Invalid("a malformed verity superblock".into()));
        }
        let sb = VeritySuperblock {
            algorithm,
            data_block_size: u32_at(64),
            hash_block_size: u32_at(68),
            data_blocks: u64::from_le_bytes(
                b[72..80].try_into().map_err(|_| DmError::Invalid("short superblock".into()))?,
            ),
            salt: b[88..88 + salt_size].iter().map(|x| format!("{x:02x}")).collect(),
            hash_type: u32_at(12),
        };
        let ok = |s: u32| (512..=65536).contains(&s) && s.is_power_of_two();
        if !ok(sb.data_block_size) || !ok(sb.hash_block_size) {
            return Err(DmError::Invalid("a verity superblock with impossible block sizes".into()));
        }
        Ok(sb)
    }
}

/// One verity mapping to create.
#[derive(Debug, Clone)]
pub struct VeritySpec {
    /// The dm name.
    pub name: String,
    /// The data device.
    pub data: PathBuf,
    /// The hash device.
    pub hash: PathBuf,
    /// Byte offset of the verity superblock on the hash device.
    pub hash_offset: u64,
    /// The root hash the caller trusts (hex).
    pub root_hash: String,
}

fn dev_number(path: &Path) -> Result<String, DmError> {
    let m = std::fs::metadata(path).map_err(DmError::with(path.display().to_string()))?;
    let rdev = m.rdev();
    Ok(format!("{}:{}", nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev)))
}

/// The `verity` table line for `spec` (reads the superblock from the hash device).
pub fn table(spec: &VeritySpec) -> Result<(u64, String), DmError> {
    let hash = spec.hash.display().to_string();
    let mut f = File::open(&spec.hash).map_err(DmError::with(&hash))?;
    let mut b = [0u8; 512];
    f.seek(SeekFrom::Start(spec.hash_offset)).map_err(DmError::with(&hash))?;
    f.read_exact(&mut b).map_err(DmError::with(&hash))?;
    let sb = VeritySuperblock::parse(&b)?;
    if !spec.root_hash.chars().all(|c| c.is_ascii_hexdigit()) || spec.root_hash.is_empty() {
        return Err(DmError::Invalid(format!("root hash {:?} is not hex", spec.root_hash)));
    }
    let sectors = sb.data_blocks * u64::from(sb.data_block_size) / 512;
    let hash_start = spec.hash_offset / u64::from(sb.hash_block_size) + 1;
    let salt = if sb.salt.is_empty() { "-".to_owned() } else { sb.salt.clone() };
    let line = format!(
        "{} {} {} {} {} {} {} {} {} {}",
        sb.hash_type,
        dev_number(&spec.data)?,
        dev_number(&spec.hash)?,
        sb.data_block_size,
        sb.hash_block_size,
        sb.data_blocks,
        hash_start,
        sb.algorithm,
        spec.root_hash,
        salt
    );
    Ok((sectors, line))
}

/// A `struct dm_ioctl` header (and room for `extra` bytes of payload after it).
fn header(name: &str, flags: u32, extra: usize) -> Result<Vec<u8>, DmError> {
    if name.len() >= 128 {
        return Err(DmError::Invalid(format!("dm name {name:?} too long")));
    }
    let size = DM_IOCTL_SIZE + extra;
    let mut b = vec![0u8; size];
    b[0..4].copy_from_slice(&4u32.to_ne_bytes());
    b[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
    b[16..20].copy_from_slice(&(DM_IOCTL_SIZE as u32).to_ne_bytes());
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    Ok(b)
}

/// One device-mapper ioctl; `what` names the operation in the error.
fn ioctl(control: &File, cmd: u8, buf: &mut [u8], what: impl FnOnce() -> String) -> Result<(), DmError> {
    let request = nix::request_code_readwrite!(0xfd, cmd, DM_IOCTL_SIZE);
    // SAFETY: `buf` is a live, writable buffer at least DM_IOCTL_SIZE bytes long whose `data_size` field says its
    // real length; the kernel reads and writes only within `data_size`.
    let r = unsafe { libc::ioctl(control.as_raw_fd(), request as _, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(DmError::last(what()));
    }
    Ok(())
}

fn control() -> Result<File, DmError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(DmError::with("/dev/mapper/control (is dm_mod loaded?)"))
}

/// Creates the read-only verity device of `spec` and returns its node (`/dev/dm-N`).
pub fn create_verity(spec: &VeritySpec) -> Result<PathBuf, DmError> {
    let (sectors, params) = table(spec)?;
    let ctl = control()?;
    let mut create = header(&spec.name, DM_READONLY_FLAG, 0)?;
    ioctl(&ctl, DM_DEV_CREATE, &mut create, || format!("creating dm device {}", spec.name))?;
    let result = load_and_resume(&ctl, spec, sectors, &params);
    if let Err(e) = result {
        let mut remove = header(&spec.name, 0, 0)?;
        let _ = ioctl(&ctl, DM_DEV_REMOVE, &mut remove, String::new);
        return Err(e);
    }
    let dev = u64::from_ne_bytes(
        create[40..48].try_into().map_err(|_| DmError::Invalid("a short reply to DM_DEV_CREATE".into()))?,
    );
    // The kernel's huge_encode_dev: minor's low 8 bits, then major, then minor's high bits.
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    Ok(PathBuf::from(format!("/dev/dm-{minor}")))
}

fn load_and_resume(ctl: &File, spec: &VeritySpec, sectors: u64, params: &str) -> Result<(), DmError> {
    let mut payload = vec![0u8; DM_TARGET_SPEC_SIZE];
    payload[8..16].copy_from_slice(&sectors.to_ne_bytes());
    payload[24..30].copy_from_slice(b"verity");
    payload.extend_from_slice(params.as_bytes());
    payload.push(0);
    while !payload.len().is_multiple_of(8) {
        payload.push(0);
    }
    let next = payload.len() as u32;
    payload[20..24].copy_from_slice(&next.to_ne_bytes());
    let mut load = header(&spec.name, DM_READONLY_FLAG, payload.len())?;
    load[20..24].copy_from_slice(&1u32.to_ne_bytes());
    load[DM_IOCTL_SIZE..].copy_from_slice(&payload);
    ioctl(ctl, DM_TABLE_LOAD, &mut load, || format!("loading the verity table ({params})"))?;
    let mut resume = header(&spec.name, 0, 0)?;
    ioctl(ctl, DM_DEV_SUSPEND, &mut resume, || format!("resuming {}", spec.name))
}

/// Removes a dm device by name (a verity device that failed its check).
pub fn remove(name: &str) -> Result<(), DmError> {
    let ctl = control()?;
    let mut remove = header(name, 0, 0)?;
    ioctl(&ctl, DM_DEV_REMOVE, &mut remove, || format!("removing dm device {name}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_superblock_parses_and_garbage_does_not() {
        let mut b = vec![0u8; 512];
        b[..8].copy_from_slice(b"verity\0\0");
        b[8] = 1;
        b[12] = 1;
        b[32..38].copy_from_slice(b"sha256");
        b[64..68].copy_from_slice(&4096u32.to_le_bytes());
        b[68..72].copy_from_slice(&4096u32.to_le_bytes());
        b[72..80].copy_from_slice(&1000u64.to_le_bytes());
        b[80..82].copy_from_slice(&2u16.to_le_bytes());
        b[88..90].copy_from_slice(&[0xab, 0x01]);
        let sb = VeritySuperblock::parse(&b).unwrap();
        assert_eq!(sb.algorithm, "sha256");
        assert_eq!(sb.data_blocks, 1000);
        assert_eq!(sb.salt, "ab01");
        b[64] = 3;
        assert!(VeritySuperblock::parse(&b).is_err());
        assert!(VeritySuperblock::parse(&[0u8; 512]).is_err());
    }
}
