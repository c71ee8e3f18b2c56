//! The lease table: which address is bound to which MAC until when, which are quarantined after a DECLINE, and
//! the short-lived offers that are not yet leases. Pure data; [`crate::store`] makes bound leases durable.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use herd_inventory::Mac;
use serde::{Deserialize, Serialize};

/// The state of a recorded address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LeaseState {
    /// Acknowledged to `mac` until `expires`.
    Bound,
    /// Given back by the client (RELEASE); free, but preferred for the same MAC next time.
    Released,
    /// Declined by a client (someone else answers on it): not handed out until `expires`.
    Declined,
}

/// One recorded address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The address.
    pub ip: Ipv4Addr,
    /// The client's hardware address.
    pub mac: Mac,
    /// Unix seconds when the lease (or quarantine) ends.
    pub expires: u64,
    /// Bound, released or declined.
    pub state: LeaseState,
}

impl Lease {
    /// Whether the address is unavailable to other clients at `now`.
    pub fn holds(&self, now: u64) -> bool {
        match self.state {
            LeaseState::Bound | LeaseState::Declined => self.expires > now,
            LeaseState::Released => false,
        }
    }
}

/// The in-memory lease table.
#[derive(Debug, Default)]
pub struct LeaseTable {
    by_ip: HashMap<Ipv4Addr, Lease>,
    by_mac: HashMap<Mac, Ipv4Addr>,
    /// Outstanding offers: address → (MAC, until). Offers are not durable: losing one costs a retry.
    offers: HashMap<Ipv4Addr, (Mac, u64)>,
    /// The outstanding offer of each MAC, so a client repeating DISCOVER gets the same address back instead of
    /// holding a second one.
    offer_of: HashMap<Mac, Ipv4Addr>,
}

impl LeaseTable {
    /// A table holding `leases` (as loaded from the store).
    pub fn from_leases(leases: impl IntoIterator<Item = Lease>) -> Self {
        let mut table = LeaseTable::default();
        for lease in leases {
            table.put(lease);
        }
        table
    }

    /// Records a lease, replacing what was known about its address and its MAC's previous address.
    pub fn put(&mut self, lease: Lease) {
        if let Some(old) = self.by_ip.get(&lease.ip)
            && old.mac != lease.mac
            && self.by_mac.get(&old.mac) == Some(&lease.ip)
        {
            self.by_mac.remove(&old.mac);
        }
        if lease.state != LeaseState::Declined {
            if let Some(prev_ip) = self.by_mac.insert(lease.mac, lease.ip)
                && prev_ip != lease.ip
                && self.by_ip.get(&prev_ip).is_some_and(|l| l.mac == lease.mac && l.state != LeaseState::Declined)
            {
                self.by_ip.remove(&prev_ip);
            }
        } else if self.by_mac.get(&lease.mac) == Some(&lease.ip) {
            self.by_mac.remove(&lease.mac);
        }
        if self.offers.remove(&lease.ip).is_some() {
            self.offer_of.remove(&lease.mac);
        }
        self.by_ip.insert(lease.ip, lease);
    }

    /// What is recorded for an address.
    pub fn get(&self, ip: Ipv4Addr) -> Option<&Lease> {
        self.by_ip.get(&ip)
    }

    /// The last address a MAC was bound to (bound or released).
    pub fn of_mac(&self, mac: Mac) -> Option<&Lease> {
        self.by_mac.get(&mac).and_then(|ip| self.by_ip.get(ip))
    }

    /// Whether `ip` may be offered to `mac` at `now`: not held by another client, not quarantined, not offered to
    /// someone else.
    pub fn available_for(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        let lease_ok = match self.by_ip.get(&ip) {
            Some(l) if l.state == LeaseState::Declined => !l.holds(now),
            Some(l) => l.mac == mac || !l.holds(now),
            None => true,
        };
        let offer_ok = match self.offers.get(&ip) {
            Some((m, until)) => *m == mac || *until <= now,
            None => true,
        };
        lease_ok && offer_ok
    }

    /// Remembers an offer of `ip` to `mac` until `until` (replacing the MAC's previous offer).
    pub fn offer(&mut self, ip: Ipv4Addr, mac: Mac, until: u64) {
        if let Some(previous) = self.offer_of.insert(mac, ip)
            && previous != ip
            && self.offers.get(&previous).is_some_and(|(m, _)| *m == mac)
        {
            self.offers.remove(&previous);
        }
        self.offers.insert(ip, (mac, until));
    }

    /// The address currently offered to `mac`, if the offer still stands at `now`.
    pub fn offered_to(&self, mac: Mac, now: u64) -> Option<Ipv4Addr> {
        let ip = *self.offer_of.get(&mac)?;
        matches!(self.offers.get(&ip), Some((m, until)) if *m == mac && *until > now).then_some(ip)
    }

    /// Forgets a MAC's offer (the client chose another server).
    pub fn withdraw_offer(&mut self, mac: Mac) {
        if let Some(ip) = self.offer_of.remove(&mac)
            && self.offers.get(&ip).is_some_and(|(m, _)| *m == mac)
        {
            self.offers.remove(&ip);
        }
    }

    /// Number of addresses bound at `now`.
    pub fn bound(&self, now: u64) -> usize {
        self.by_ip.values().filter(|l| l.state == LeaseState::Bound && l.expires > now).count()
    }

    /// Every recorded lease.
    pub fn iter(&self) -> impl Iterator<Item = &Lease> {
        self.by_ip.values()
    }
}

/// Bound leases as the DHCP service last committed them, indexed both ways: the config endpoint checks a request's
/// source address against the MAC's lease; TFTP and HTTP find which machine an address belongs to.
#[derive(Debug, Default)]
pub struct LeaseView {
    maps: std::sync::Mutex<(HashMap<Mac, Ipv4Addr>, HashMap<Ipv4Addr, Mac>)>,
}

impl LeaseView {
    /// Records that `mac` holds `ip` (or nothing).
    pub fn set(&self, mac: Mac, ip: Option<Ipv4Addr>) {
        let Ok(mut maps) = self.maps.lock() else { return };
        let (by_mac, by_ip) = &mut *maps;
        if let Some(old) = by_mac.remove(&mac)
            && by_ip.get(&old) == Some(&mac)
        {
            by_ip.remove(&old);
        }
        if let Some(ip) = ip {
            if let Some(previous) = by_ip.insert(ip, mac)
                && previous != mac
            {
                by_mac.remove(&previous);
            }
            by_mac.insert(mac, ip);
        }
    }

    /// The address leased to `mac`.
    pub fn of(&self, mac: Mac) -> Option<Ipv4Addr> {
        self.maps.lock().ok().and_then(|m| m.0.get(&mac).copied())
    }

    /// The MAC holding `ip`.
    pub fn holder(&self, ip: Ipv4Addr) -> Option<Mac> {
        self.maps.lock().ok().and_then(|m| m.1.get(&ip).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac::from_octets([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, n)
    }

    #[test]
    fn bound_addresses_are_not_available_to_others_until_expiry() {
        let mut t = LeaseTable::default();
        t.put(Lease { ip: ip(5), mac: mac(1), expires: 100, state: LeaseState::Bound });
        assert!(t.available_for(ip(5), mac(1), 50));
        assert!(!t.available_for(ip(5), mac(2), 50));
        assert!(t.available_for(ip(5), mac(2), 100));
        assert_eq!(t.bound(50), 1);
    }

    #[test]
    fn declined_addresses_are_quarantined_for_everyone() {
        let mut t = LeaseTable::default();
        t.put(Lease { ip: ip(5), mac: mac(1), expires: 100, state: LeaseState::Declined });
        assert!(!t.available_for(ip(5), mac(1), 50));
        assert!(t.available_for(ip(5), mac(1), 101));
        assert!(t.of_mac(mac(1)).is_none());
    }

    #[test]
    fn a_mac_moving_to_a_new_address_frees_the_old_one() {
        let mut t = LeaseTable::default();
        t.put(Lease { ip: ip(5), mac: mac(1), expires: 100, state: LeaseState::Bound });
        t.put(Lease { ip: ip(6), mac: mac(1), expires: 100, state: LeaseState::Bound });
        assert!(t.get(ip(5)).is_none());
        assert_eq!(t.of_mac(mac(1)).unwrap().ip, ip(6));
    }

    #[test]
    fn the_lease_view_stays_consistent_both_ways() {
        let v = LeaseView::default();
        v.set(mac(1), Some(ip(5)));
        v.set(mac(1), Some(ip(6)));
        assert_eq!((v.of(mac(1)), v.holder(ip(5)), v.holder(ip(6))), (Some(ip(6)), None, Some(mac(1))));
        // Another MAC of the same machine takes the address over.
        v.set(mac(2), Some(ip(6)));
        assert_eq!((v.of(mac(1)), v.holder(ip(6))), (None, Some(mac(2))));
        v.set(mac(2), None);
        assert_eq!(v.holder(ip(6)), None);
    }

    #[test]
    fn offers_block_other_clients_until_they_lapse() {
        let mut t = LeaseTable::default();
        t.offer(ip(7), mac(1), 30);
        assert!(!t.available_for(ip(7), mac(2), 10));
        assert!(t.available_for(ip(7), mac(1), 10));
        assert!(t.available_for(ip(7), mac(2), 30));
        t.withdraw_offer(mac(1));
        assert!(t.available_for(ip(7), mac(2), 10));
    }

    #[test]
    fn a_mac_holds_one_offer_at_a_time() {
        let mut t = LeaseTable::default();
        t.offer(ip(7), mac(1), 30);
        t.offer(ip(8), mac(1), 30);
        assert!(t.available_for(ip(7), mac(2), 10), "the first offer was replaced");
        assert_eq!(t.offered_to(mac(1), 10), Some(ip(8)));
        assert_eq!(t.offered_to(mac(1), 30), None, "lapsed");
    }
}
