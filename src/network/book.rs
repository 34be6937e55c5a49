//! The address book: where each known vat can be reached.

use std::collections::HashMap;

use crate::sturdy::{Address, MAX_ADDRESSES};
use crate::vat_id::VatId;

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
    addresses: Vec<Address>,
    used: u64,
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

    /// Adds `addresses` after those already known for `vat` (known ones keep
    /// their place: they are the ones that worked or were configured), without
    /// duplicates, up to [`MAX_ADDRESSES`].
    pub(crate) fn learn(&mut self, vat: VatId, addresses: &[Address]) {
        if addresses.is_empty() {
            return;
        }
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
        for a in addresses {
            if entry.addresses.len() >= MAX_ADDRESSES {
                break;
            }
            if !entry.addresses.contains(a) {
                entry.addresses.push(a.clone());
            }
        }
    }

    /// The addresses known for `vat`, in order of preference.
    pub(crate) fn get(&mut self, vat: &VatId) -> Vec<Address> {
        let used = self.tick();
        match self.entries.get_mut(vat) {
            Some(e) => {
                e.used = used;
                e.addresses.clone()
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
}
