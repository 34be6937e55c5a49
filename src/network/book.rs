//! The address book: where each known vat can be reached.
//!
//! Two kinds of addresses: **configured** ones, given by the application
//! ([`Network::add_addresses`](super::Network::add_addresses), sturdy refs),
//! which come first and stay; and **learned** ones, address hints of an
//! introduction through which a connection pinned to the vat succeeded,
//! which come after them and are forgotten after
//! [`FAILURES_TO_FORGET`] failed dials in a row. An introduction's hints
//! that did not lead to the vat are never kept: any vat can sign an
//! introduction naming any provider, so hints are the introducer's word,
//! not the provider's.

use std::collections::HashMap;

use crate::sturdy::{Address, MAX_ADDRESSES};
use crate::vat_id::VatId;

/// Failed dials in a row after which a learned address is forgotten.
pub(crate) const FAILURES_TO_FORGET: u8 = 2;

/// VatId -> addresses, at most `max_vats` vats and [`MAX_ADDRESSES`] addresses
/// each. When full, the vat whose entry was used least recently is forgotten.
#[derive(Debug)]
pub(crate) struct AddressBook {
    max_vats: usize,
    entries: HashMap<VatId, Entry>,
    clock: u64,
}

#[derive(Debug)]
struct Entry {
    /// Configured addresses first, then learned ones.
    addresses: Vec<Known>,
    used: u64,
}

#[derive(Debug)]
struct Known {
    address: Address,
    configured: bool,
    /// Failed dials in a row.
    failures: u8,
}

impl AddressBook {
    pub(crate) fn new(max_vats: usize) -> Self {
        AddressBook {
            max_vats: max_vats.max(1),
            entries: HashMap::new(),
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Adds configured `addresses` for `vat`, after the configured ones
    /// already known and before any learned ones (which give way if the
    /// entry is full), without duplicates, up to [`MAX_ADDRESSES`]. An
    /// address already learned becomes configured.
    pub(crate) fn learn(&mut self, vat: VatId, addresses: &[Address]) {
        if addresses.is_empty() {
            return;
        }
        let entry = self.entry(vat);
        for a in addresses {
            if let Some(k) = entry.addresses.iter_mut().find(|k| k.address == *a) {
                k.configured = true;
                continue;
            }
            if entry.addresses.len() >= MAX_ADDRESSES {
                // A learned address gives way to a configured one.
                match entry.addresses.iter().rposition(|k| !k.configured) {
                    Some(i) => {
                        entry.addresses.remove(i);
                    }
                    None => break,
                }
            }
            let at = entry
                .addresses
                .iter()
                .position(|k| !k.configured)
                .unwrap_or(entry.addresses.len());
            entry.addresses.insert(
                at,
                Known {
                    address: a.clone(),
                    configured: true,
                    failures: 0,
                },
            );
        }
        sort_configured_first(&mut entry.addresses);
    }

    /// A dial pinned to `vat` succeeded through `address`: keep it (as a
    /// learned address, after the configured ones, if there is room) and
    /// clear its failures.
    pub(crate) fn confirm(&mut self, vat: VatId, address: &Address) {
        let entry = self.entry(vat);
        if let Some(k) = entry.addresses.iter_mut().find(|k| k.address == *address) {
            k.failures = 0;
        } else if entry.addresses.len() < MAX_ADDRESSES {
            entry.addresses.push(Known {
                address: address.clone(),
                configured: false,
                failures: 0,
            });
        }
    }

    /// A dial to `vat` through `address` failed: a learned address that
    /// failed [`FAILURES_TO_FORGET`] times in a row is forgotten.
    pub(crate) fn failed(&mut self, vat: &VatId, address: &Address) {
        let Some(entry) = self.entries.get_mut(vat) else {
            return;
        };
        if let Some(i) = entry.addresses.iter().position(|k| k.address == *address) {
            let k = &mut entry.addresses[i];
            k.failures = k.failures.saturating_add(1);
            if !k.configured && k.failures >= FAILURES_TO_FORGET {
                entry.addresses.remove(i);
            }
        }
        if entry.addresses.is_empty() {
            self.entries.remove(vat);
        }
    }

    /// The entry of `vat`, made (forgetting the least recently used vat if
    /// the book is full) if needed, marked as used now.
    fn entry(&mut self, vat: VatId) -> &mut Entry {
        if !self.entries.contains_key(&vat) && self.entries.len() >= self.max_vats {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(v, _)| *v)
            {
                self.entries.remove(&oldest);
            }
        }
        let used = self.tick();
        let entry = self.entries.entry(vat).or_insert(Entry {
            addresses: Vec::new(),
            used,
        });
        entry.used = used;
        entry
    }

    /// The addresses known for `vat`, in order of preference.
    pub(crate) fn get(&mut self, vat: &VatId) -> Vec<Address> {
        let used = self.tick();
        match self.entries.get_mut(vat) {
            Some(e) => {
                e.used = used;
                e.addresses.iter().map(|k| k.address.clone()).collect()
            }
            None => Vec::new(),
        }
    }

    /// Forgets `vat`.
    pub(crate) fn forget(&mut self, vat: &VatId) {
        self.entries.remove(vat);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Configured addresses first, each kind in its own order.
fn sort_configured_first(addresses: &mut [Known]) {
    addresses.sort_by_key(|k| !k.configured);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn vat(n: u8) -> VatId {
        Identity::from_seed(&[n; 32]).vat_id()
    }

    fn addr(port: u16) -> Address {
        format!("127.0.0.1:{port}").parse().unwrap()
    }

    #[test]
    fn keeps_order_dedups_and_caps_addresses() {
        let mut book = AddressBook::new(8);
        book.learn(vat(1), &[addr(1), addr(2)]);
        book.learn(vat(1), &[addr(2), addr(3)]);
        assert_eq!(book.get(&vat(1)), vec![addr(1), addr(2), addr(3)]);
        let many: Vec<Address> = (10..40).map(addr).collect();
        book.learn(vat(1), &many);
        assert_eq!(book.get(&vat(1)).len(), MAX_ADDRESSES);
        assert!(book.get(&vat(2)).is_empty());
    }

    #[test]
    fn forgets_the_least_recently_used_vat_when_full() {
        let mut book = AddressBook::new(2);
        book.learn(vat(1), &[addr(1)]);
        book.learn(vat(2), &[addr(2)]);
        let _ = book.get(&vat(1)); // vat 2 is now the least recently used
        book.learn(vat(3), &[addr(3)]);
        assert_eq!(book.len(), 2);
        assert!(book.get(&vat(2)).is_empty());
        assert_eq!(book.get(&vat(1)), vec![addr(1)]);
        assert_eq!(book.get(&vat(3)), vec![addr(3)]);
        book.forget(&vat(3));
        assert!(book.get(&vat(3)).is_empty());
    }

    #[test]
    fn configured_addresses_win_and_failing_learned_ones_age_out() {
        let mut book = AddressBook::new(8);
        let learned: Vec<Address> = (100..100 + MAX_ADDRESSES as u16).map(addr).collect();
        for a in &learned {
            book.confirm(vat(1), a);
        }
        assert_eq!(book.get(&vat(1)), learned);
        // A configured address goes first, the last learned one gives way.
        book.learn(vat(1), &[addr(1)]);
        let got = book.get(&vat(1));
        assert_eq!(got[0], addr(1));
        assert_eq!(got.len(), MAX_ADDRESSES);
        assert!(!got.contains(learned.last().unwrap()));
        // A learned address that fails twice in a row is forgotten; a
        // success in between clears its count; configured ones stay.
        book.failed(&vat(1), &learned[0]);
        book.confirm(vat(1), &learned[0]);
        book.failed(&vat(1), &learned[0]);
        assert!(book.get(&vat(1)).contains(&learned[0]));
        book.failed(&vat(1), &learned[0]);
        assert!(!book.get(&vat(1)).contains(&learned[0]));
        for _ in 0..5 {
            book.failed(&vat(1), &addr(1));
        }
        assert_eq!(book.get(&vat(1))[0], addr(1));
    }
}
