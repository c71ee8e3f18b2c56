//! The machine's bond, built in the initramfs just before `switch_root` from `/etc/herd/bond.json`
//! ([`herd_config::node::BondConfig`]): the bonding driver's sysfs files and the socket ioctls of [`crate::net`].
//! The node's address then works from the first moment of the real root, so etcd's members find each other while
//! udev is still working through its coldplug queue; systemd-networkd, whose files describe the same bond, takes it
//! over as it is (`KeepConfiguration=static`) once udev has seen the NICs.
//!
//! Without this, the bond appears only when networkd creates it, and its udev event waits behind the whole coldplug:
//! 10-15 s under QEMU TCG with three machines on two host cores.

use std::net::Ipv4Addr;
use std::path::Path;

use herd_config::node::EarlyBond;

use crate::error::SysError;

const SYSFS_NET: &str = "/sys/class/net";

/// Why the bond was not built in the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum BondError {
    /// bond.json describes a bond that cannot be built as written.
    #[error("{0}")]
    Invalid(String),
    /// None of its member NICs is there.
    #[error("none of its NICs ({}) is present", members.join(", "))]
    NoMembers {
        /// The members' MACs.
        members: Vec<String>,
    },
    /// The bonding driver's control file is missing.
    #[error("{path} is missing: the bonding driver is not loaded")]
    NoDriver {
        /// The file.
        path: String,
    },
    /// The kernel refused a step.
    #[error(transparent)]
    Sys(#[from] SysError),
}

fn write_sysfs(path: &str, value: &str) -> Result<(), SysError> {
    std::fs::write(path, value).map_err(SysError::with(format!("writing {value:?} to {path}")))
}

/// What [`build`] needs, checked before anything is touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    mac: [u8; 6],
    address: Ipv4Addr,
    prefix: u8,
    gateway: Option<Ipv4Addr>,
}

/// Checks the bond of bond.json: MACs, address and gateway must parse.
pub fn plan(b: &EarlyBond) -> Result<Plan, BondError> {
    let invalid = |text: String| BondError::Invalid(text);
    let mac = crate::dhcp::parse_mac(&b.mac).ok_or_else(|| invalid(format!("bond MAC {:?} is not a MAC", b.mac)))?;
    if let Some(m) = b.members.iter().find(|m| crate::dhcp::parse_mac(m).is_none()) {
        return Err(invalid(format!("member {m:?} is not a MAC")));
    }
    if b.members.is_empty() {
        return Err(invalid("the bond has no members".into()));
    }
    let (addr, prefix) =
        b.address.split_once('/').ok_or_else(|| invalid(format!("address {:?} has no /prefix", b.address)))?;
    let address = addr.parse().map_err(|_| invalid(format!("address {:?} is not IPv4", b.address)))?;
    let prefix =
        prefix.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(|| invalid(format!("prefix of {:?}", b.address)))?;
    let gateway = match &b.gateway {
        Some(g) => Some(g.parse().map_err(|_| invalid(format!("gateway {g:?} is not IPv4")))?),
        None => None,
    };
    Ok(Plan { mac, address, prefix, gateway })
}

/// A member NIC: its permanent MAC (the config's name for it) and its interface.
struct Nic {
    mac: String,
    ifname: String,
}

/// Builds the bond and gives it its address and default route; returns a line for the console. On failure the
/// bond is removed again (its NICs stay down), so networkd starts from clean links as it would without this.
///
/// Members whose NIC is not there (a dead card, a driver the initramfs lacks) are left out: networkd enslaves them
/// when they appear. Their drivers loaded with the others well before this (the boot NIC has been up since DHCP),
/// so nothing is waited for.
pub fn build(b: &EarlyBond) -> Result<String, BondError> {
    let plan = plan(b)?;
    // Every member's interface before the first is enslaved: an active-backup bond gives its members its own MAC.
    let (nics, missing): (Vec<_>, Vec<_>) =
        b.members.iter().map(|m| (m, crate::net::interface_by_mac(m))).partition(|(_, ifname)| ifname.is_some());
    let nics: Vec<Nic> = nics.into_iter().filter_map(|(m, i)| Some(Nic { mac: m.clone(), ifname: i? })).collect();
    if nics.is_empty() {
        return Err(BondError::NoMembers { members: b.members.clone() });
    }
    let built = enslave(b, &plan, &nics);
    if built.is_err() && Path::new(&format!("{SYSFS_NET}/{}", b.name)).exists() {
        let _ = write_sysfs(&format!("{SYSFS_NET}/bonding_masters"), &format!("-{}", b.name));
    }
    built?;
    let mut notes = String::new();
    if !missing.is_empty() {
        let macs: Vec<&str> = missing.iter().map(|(m, _)| m.as_str()).collect();
        notes.push_str(&format!("; not present: {} (networkd adds them when they appear)", macs.join(", ")));
    }
    if let Err(e) = keep_members(&b.name, &nics) {
        notes.push_str(&format!("; networkd will enslave the NICs again ({})", crate::error::chain(&e)));
    }
    let over: Vec<&str> = nics.iter().map(|n| n.ifname.as_str()).collect();
    Ok(format!("{} ({}) over {} with {}/{}{notes}", b.name, b.mode, over.join(", "), plan.address, plan.prefix))
}

/// Where networkd reads runtime drop-ins (this boot only: /run moves into the new root).
const NETWORKD_RUNTIME: &str = "/run/systemd/network";

/// Tells networkd, for this boot, to leave each NIC in the bond node-init put it in (`KeepMaster=`): to enslave a
/// NIC itself it takes the link down and up again, a blip on the bond and, with LACP, a renegotiation with the
/// switch. NICs node-init did not enslave have no drop-in, and networkd enslaves them as usual. The member's
/// `Bond=` is emptied too: networkd ignores it under `KeepMaster=` anyway, but warns about it every boot if it is set.
fn keep_members(bond: &str, nics: &[Nic]) -> Result<(), SysError> {
    for n in nics {
        let dir = format!("{NETWORKD_RUNTIME}/{}.d", herd_config::node::bond_member_network(bond, &n.mac));
        std::fs::create_dir_all(&dir).map_err(SysError::with(format!("mkdir {dir}")))?;
        let text = format!(
            "# Written by node-init: it made this NIC a member of {bond} in the initramfs.\n\
             [Network]\nBond=\nKeepMaster=yes\n"
        );
        let path = format!("{dir}/50-herd-early-bond.conf");
        std::fs::write(&path, text).map_err(SysError::with(path))?;
    }
    Ok(())
}

fn enslave(b: &EarlyBond, plan: &Plan, nics: &[Nic]) -> Result<(), BondError> {
    let masters = format!("{SYSFS_NET}/bonding_masters");
    if !Path::new(&masters).exists() {
        return Err(BondError::NoDriver { path: masters });
    }
    for n in nics {
        crate::net::link_down(&n.ifname)?;
    }
    if !Path::new(&format!("{SYSFS_NET}/{}", b.name)).exists() {
        write_sysfs(&masters, &format!("+{}", b.name))?;
    }
    let dir = format!("{SYSFS_NET}/{}/bonding", b.name);
    for s in b.mode.settings() {
        write_sysfs(&format!("{dir}/{}", s.sysfs.0), s.sysfs.1)?;
    }
    crate::net::set_mac(&b.name, plan.mac)?;
    if let Some(mtu) = b.mtu {
        crate::net::set_mtu(&b.name, mtu)?;
    }
    for n in nics {
        write_sysfs(&format!("{dir}/slaves"), &format!("+{}", n.ifname))?;
    }
    if let Some(primary) = nics.iter().find(|n| b.primary.as_ref() == Some(&n.mac)) {
        write_sysfs(&format!("{dir}/primary"), &primary.ifname)?;
    }
    crate::net::link_up(&b.name)?;
    crate::net::set_address(&b.name, plan.address, plan.prefix)?;
    if let Some(gw) = plan.gateway {
        crate::net::add_default_route(gw)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use herd_inventory::BondMode;

    fn bond() -> EarlyBond {
        EarlyBond {
            name: "bond0".into(),
            mode: BondMode::ActiveBackup,
            mac: "52:54:00:99:01:01".into(),
            members: vec!["52:54:00:99:01:01".into(), "52:54:00:99:01:02".into()],
            primary: Some("52:54:00:99:01:01".into()),
            mtu: Some(1500),
            address: "10.99.0.11/24".into(),
            gateway: Some("10.99.0.1".into()),
        }
    }

    #[test]
    fn a_plan_takes_the_address_prefix_mac_and_gateway_apart() {
        let p = plan(&bond()).unwrap();
        assert_eq!(p.address, Ipv4Addr::new(10, 99, 0, 11));
        assert_eq!(p.prefix, 24);
        assert_eq!(p.mac, [0x52, 0x54, 0, 0x99, 1, 1]);
        assert_eq!(p.gateway, Some(Ipv4Addr::new(10, 99, 0, 1)));
    }

    #[test]
    fn a_bond_that_cannot_be_built_as_written_is_refused_before_anything_is_touched() {
        type Spoil = fn(&mut EarlyBond);
        let cases: [(&str, Spoil); 6] = [
            ("no /prefix", |b| b.address = "10.99.0.11".into()),
            ("is not IPv4", |b| b.address = "fd00::1/64".into()),
            ("prefix of", |b| b.address = "10.99.0.11/33".into()),
            ("bond MAC", |b| b.mac = "52:54:00".into()),
            ("is not a MAC", |b| b.members.push("nic3".into())),
            ("gateway", |b| b.gateway = Some("router".into())),
        ];
        for (want, spoil) in cases {
            let mut b = bond();
            spoil(&mut b);
            let err = plan(&b).unwrap_err();
            assert!(matches!(&err, BondError::Invalid(text) if text.contains(want)), "{want}: {err}");
        }
        let mut b = bond();
        b.members.clear();
        assert!(plan(&b).unwrap_err().to_string().contains("no members"));
    }
}
