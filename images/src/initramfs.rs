//! The initramfs: node-init as `/init` and the few kernel modules it loads before the verified root is mounted
//! (block and network drivers, dm-verity, squashfs, overlay, ext4, bonding), uncompressed and listed in load order,
//! in a gzip-compressed `newc` cpio archive. Byte-identical for the same inputs (fixed timestamps, sorted, no
//! inode numbers from the host).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where node-init finds the modules and their order inside the initramfs.
pub const MODULE_DIR: &str = "lib/modules";
/// The load-order file (one module file name per line, dependencies first).
pub const LOAD_ORDER: &str = "lib/modules/load-order";

/// A `newc` archive being written.
#[derive(Debug)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
    mtime: u32,
}

impl Cpio {
    /// An empty archive whose entries carry `mtime`.
    pub fn new(mtime: u64) -> Cpio {
        Cpio { out: Vec::new(), ino: 1, mtime: u32::try_from(mtime).unwrap_or(u32::MAX) }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [self.ino, mode, 0, 0, nlink, self.mtime, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (mode & 0o7777), data);
    }

    /// A symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes());
    }

    /// The archive, gzip-compressed (no timestamp in the gzip header).
    pub fn finish(mut self) -> std::io::Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, &[]);
        let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
        gz.write_all(&self.out)?;
        gz.finish()
    }
}

/// A module's canonical name: file stem without `.ko*`, with `-` as `_` (as the kernel and modprobe treat them).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules to load for `wanted`, dependencies first, each once: relative paths from `modules.dep`. Modules
/// built into the kernel (`modules.builtin`) need nothing; a name that is neither is an error.
pub fn closure(moddir: &Path, wanted: &[String]) -> Result<Vec<String>, String> {
    let read = |f: &str| std::fs::read_to_string(moddir.join(f)).map_err(|e| format!("{}/{f}: {e}", moddir.display()));
    let dep_text = read("modules.dep")?;
    let builtin: BTreeSet<String> = read("modules.builtin")?.lines().map(module_name).collect();
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((path, rest)) = line.split_once(':') else { continue };
        deps.insert(module_name(path), (path.to_owned(), rest.split_whitespace().map(str::to_owned).collect()));
    }
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, ds)) = deps.get(name) {
            for d in ds {
                visit(&module_name(d), deps, seen, order);
            }
            order.push(path.clone());
        }
    }
    for w in wanted {
        let name = module_name(w);
        if builtin.contains(&name) {
            continue;
        }
        if !deps.contains_key(&name) {
            return Err(format!("kernel module {w:?} is neither built in nor in modules.dep; check [kernel] modules"));
        }
        visit(&name, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

/// Reads a module file, decompressing `.xz`/`.zst`/`.gz` (the kernel would, but loading plain files keeps node-init
/// independent of the kernel's decompression options).
pub fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).map_err(|e| format!("{name}: {e}")),
        Some(t) => {
            let out = Command::new(t)
                .args(["-d", "-c"])
                .arg(path)
                .output()
                .map_err(|e| format!("{t} -d {name}: {e} (install xz-utils/zstd)"))?;
            if !out.status.success() {
                return Err(format!("{t} -d {name}: {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            Ok(out.stdout)
        }
    }
}

/// What goes into the initramfs.
#[derive(Debug, Clone)]
pub struct Contents {
    /// The static node-init binary (becomes `/init`).
    pub node_init: PathBuf,
    /// `usr/lib/modules/VERSION` of the root tree.
    pub moddir: PathBuf,
    /// Modules asked for.
    pub modules: Vec<String>,
    /// A small JSON document node-init reads at `/etc/herd-initrd.json` (image name, release, kernel).
    pub info: String,
    /// Timestamp of every entry.
    pub mtime: u64,
}

/// Builds the compressed archive; returns it and the module names it loads, in order.
pub fn build(c: &Contents) -> Result<(Vec<u8>, Vec<String>), String> {
    let order = closure(&c.moddir, &c.modules)?;
    let mut cpio = Cpio::new(c.mtime);
    for d in ["dev", "etc", "lib", MODULE_DIR, "proc", "run", "sys", "sysroot", "tmp"] {
        cpio.dir(d);
    }
    let init = std::fs::read(&c.node_init).map_err(|e| format!("{}: {e}", c.node_init.display()))?;
    cpio.file("init", 0o755, &init);
    cpio.file("etc/herd-initrd.json", 0o644, c.info.as_bytes());
    let mut names = Vec::new();
    for rel in &order {
        let bytes = module_bytes(&c.moddir.join(rel))?;
        let file = format!("{}.ko", module_name(rel));
        cpio.file(&format!("{MODULE_DIR}/{file}"), 0o644, &bytes);
        names.push(file);
    }
    let mut list = names.join("\n");
    list.push('\n');
    cpio.file(LOAD_ORDER, 0o644, list.as_bytes());
    let bytes = cpio.finish().map_err(|e| e.to_string())?;
    Ok((bytes, names))
}

/// Whether `path` is a statically linked ELF executable (no `PT_INTERP` program header): what `/init` must be.
pub fn is_static_elf(path: &Path) -> Result<bool, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return Err(format!("{} is not a 64-bit ELF executable", path.display()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or_default()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > b.len() {
            break;
        }
        if u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_closure_loads_dependencies_first_once_and_skips_builtins() {
        let dir = std::env::temp_dir().join(format!("herd-initramfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/drivers/md/dm-verity.ko.xz: kernel/drivers/md/dm-bufio.ko.xz kernel/drivers/md/dm-mod.ko.xz\n\
             kernel/drivers/md/dm-bufio.ko.xz:\nkernel/drivers/md/dm-mod.ko.xz:\n\
             kernel/drivers/net/bonding/bonding.ko.xz: kernel/net/tls/tls.ko.xz\nkernel/net/tls/tls.ko.xz:\n",
        )
        .unwrap();
        std::fs::write(dir.join("modules.builtin"), "kernel/drivers/virtio/virtio_pci.ko\n").unwrap();
        let want = |w: &[&str]| closure(&dir, &w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let order = want(&["dm_verity", "virtio_pci", "bonding", "dm-mod"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/md/dm-bufio.ko.xz",
                "kernel/drivers/md/dm-mod.ko.xz",
                "kernel/drivers/md/dm-verity.ko.xz",
                "kernel/net/tls/tls.ko.xz",
                "kernel/drivers/net/bonding/bonding.ko.xz",
            ]
        );
        let err = want(&["nosuch"]).unwrap_err();
        assert!(err.contains("nosuch"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cpio_archives_are_deterministic_and_readable_by_cpio() {
        let make = || {
            let mut c = Cpio::new(1000);
            c.dir("etc");
            c.file("etc/a", 0o644, b"hello");
            c.symlink("b", "etc/a");
            c.finish().unwrap()
        };
        let a = make();
        assert_eq!(a, make());
        let dir = std::env::temp_dir().join(format!("herd-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut gunzip = flate2::read::GzDecoder::new(&a[..]);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut gunzip, &mut raw).unwrap();
        let mut child = Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&raw).unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
