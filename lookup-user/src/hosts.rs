//! Host bindings (/32 and /128), one data-plane entry per address.
//!
//! The program looks an address up once and finds, in one value, its port 0
//! destination and up to [`HOST_INLINE_PORTS`] specific ports. Addresses
//! with more specific ports keep the rest in a second table keyed by address
//! and port, which the program reads only when the entry says so. A miss, a
//! wildcard hit and a hit on one of the first ports each cost one hash
//! lookup.

use lookup_common::{BindingKey, HOST_INLINE_PORTS, HostValue, NO_DESTINATION};
use rustc_hash::FxHashMap;

/// One data-plane write for host bindings, in the order it must be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostOp {
    /// Write an overflow port entry (key carries the port).
    PortPut(BindingKey, u32),
    /// Write an address's entry (key has port 0).
    Put(BindingKey, HostValue),
    /// Remove an address's entry.
    Del(BindingKey),
    /// Remove an overflow port entry.
    PortDel(BindingKey),
}

impl HostOp {
    /// Order of the kinds when many are applied at once: overflow entries
    /// appear before the entries that point at them, and go after.
    pub fn phase(&self) -> u8 {
        match self {
            Self::PortPut(..) => 0,
            Self::Put(..) => 1,
            Self::Del(..) => 2,
            Self::PortDel(..) => 3,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Entry {
    default: Option<u32>,
    inline: [(u16, u32); HOST_INLINE_PORTS],
    extra: Option<Box<rustc_hash::FxHashMap<u16, u32>>>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.default.is_none()
            && self.inline.iter().all(|&(p, _)| p == 0)
            && self.extra.as_ref().is_none_or(|e| e.is_empty())
    }

    fn get(&self, port: u16) -> Option<u32> {
        if port == 0 {
            return self.default;
        }
        self.inline
            .iter()
            .find(|&&(p, _)| p == port)
            .map(|&(_, d)| d)
            .or_else(|| self.extra.as_ref().and_then(|e| e.get(&port).copied()))
    }

    fn value(&self) -> HostValue {
        let mut v = HostValue {
            default_destination: self.default.unwrap_or(NO_DESTINATION),
            more: u32::from(self.extra.as_ref().is_some_and(|e| !e.is_empty())),
            ports: [0; HOST_INLINE_PORTS],
            destinations: [0; HOST_INLINE_PORTS],
        };
        for (i, &(p, d)) in self.inline.iter().enumerate() {
            v.ports[i] = p;
            v.destinations[i] = d;
        }
        v
    }
}

fn addr_key(key: &BindingKey) -> BindingKey {
    BindingKey {
        port: [0, 0],
        ..*key
    }
}

/// Every host binding, by address.
#[derive(Debug, Default)]
pub struct HostIndex {
    entries: FxHashMap<BindingKey, Entry>,
    count: usize,
}

impl HostIndex {
    /// Number of host bindings.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The destination of the binding `key` (whose port is the binding's).
    pub fn get(&self, key: &BindingKey) -> Option<u32> {
        self.entries
            .get(&addr_key(key))
            .and_then(|e| e.get(u16::from_be_bytes(key.port)))
    }

    /// Every binding, as (key with port, destination).
    pub fn iter(&self) -> impl Iterator<Item = (BindingKey, u32)> + '_ {
        self.entries.iter().flat_map(|(k, e)| {
            let with = move |port: u16, d: u32| {
                (
                    BindingKey {
                        port: port.to_be_bytes(),
                        ..*k
                    },
                    d,
                )
            };
            e.default
                .map(|d| with(0, d))
                .into_iter()
                .chain(
                    e.inline
                        .iter()
                        .filter(|&&(p, _)| p != 0)
                        .map(move |&(p, d)| with(p, d)),
                )
                .chain(
                    e.extra
                        .iter()
                        .flat_map(|x| x.iter())
                        .map(move |(&p, &d)| with(p, d)),
                )
        })
    }

    /// Changes one binding without emitting anything; returns the previous
    /// destination and what became of the overflow entry, if it is one.
    /// Returns the previous destination and, if the change involved the
    /// overflow table, the op for it and the port's overflow value before.
    fn change(
        &mut self,
        key: &BindingKey,
        dest: Option<u32>,
    ) -> (Option<u32>, Option<(HostOp, Option<u32>)>) {
        let port = u16::from_be_bytes(key.port);
        let akey = addr_key(key);
        let entry = self.entries.entry(akey).or_default();
        let previous;
        let mut overflow = None;
        if port == 0 {
            previous = std::mem::replace(&mut entry.default, dest);
        } else if let Some(slot) = entry.inline.iter_mut().find(|(p, _)| *p == port) {
            previous = Some(slot.1);
            match dest {
                Some(d) => slot.1 = d,
                None => *slot = (0, 0),
            }
        } else if let Some(d) = entry.extra.as_mut().and_then(|x| x.get(&port).copied()) {
            previous = Some(d);
            let extra = entry.extra.as_mut().expect("checked");
            match dest {
                Some(new) => {
                    extra.insert(port, new);
                    overflow = Some((HostOp::PortPut(*key, new), Some(d)));
                }
                None => {
                    extra.remove(&port);
                    overflow = Some((HostOp::PortDel(*key), Some(d)));
                }
            }
        } else {
            previous = None;
            if let Some(d) = dest {
                if let Some(slot) = entry.inline.iter_mut().find(|(p, _)| *p == 0) {
                    *slot = (port, d);
                } else {
                    entry.extra.get_or_insert_default().insert(port, d);
                    overflow = Some((HostOp::PortPut(*key, d), None));
                }
            }
        }
        match (previous, dest) {
            (None, Some(_)) => self.count += 1,
            (Some(_), None) => self.count -= 1,
            _ => {}
        }
        (previous, overflow)
    }

    fn entry_op(&mut self, akey: &BindingKey) -> HostOp {
        match self.entries.get(akey) {
            Some(e) if !e.is_empty() => HostOp::Put(*akey, e.value()),
            _ => {
                self.entries.remove(akey);
                HostOp::Del(*akey)
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) one binding; appends the writes in
    /// a safe order and returns the previous destination.
    pub fn set(
        &mut self,
        key: &BindingKey,
        dest: Option<u32>,
        ops: &mut Vec<HostOp>,
    ) -> Option<u32> {
        let existed = self.entries.contains_key(&addr_key(key));
        let (previous, overflow) = self.change(key, dest);
        if previous == dest {
            if !existed {
                self.entries.remove(&addr_key(key));
            }
            return previous;
        }
        let mut batch = Vec::new();
        batch.extend(overflow.map(|(op, _)| op));
        batch.push(self.entry_op(&addr_key(key)));
        if !existed && matches!(batch.last(), Some(HostOp::Del(_))) {
            batch.pop();
        }
        batch.sort_by_key(HostOp::phase);
        ops.extend(batch);
        previous
    }

    /// Applies many changes, one write per touched address (plus overflow
    /// entries), grouped by kind in the order of [`HostOp::phase`]. Returns
    /// the previous destination of each change, in order.
    pub fn set_many(
        &mut self,
        changes: &[(BindingKey, Option<u32>)],
        ops: &mut Vec<HostOp>,
    ) -> Vec<Option<u32>> {
        let mut previous = Vec::with_capacity(changes.len());
        // Touched addresses, with whether each had an entry before.
        let mut touched: FxHashMap<BindingKey, bool> = FxHashMap::default();
        // Overflow entries are written once each, from their state before
        // and after the whole batch.
        let mut overflow_before: FxHashMap<BindingKey, Option<u32>> = FxHashMap::default();
        let mut batch = Vec::new();
        for (key, dest) in changes {
            let akey = addr_key(key);
            let had = self.entries.contains_key(&akey);
            touched.entry(akey).or_insert(had);
            let (prev, overflow) = self.change(key, *dest);
            if let Some((_, before)) = overflow {
                overflow_before.entry(*key).or_insert(before);
            }
            previous.push(prev);
        }
        for (key, before) in overflow_before {
            let after = self
                .entries
                .get(&addr_key(&key))
                .and_then(|e| e.extra.as_ref())
                .and_then(|x| x.get(&u16::from_be_bytes(key.port)).copied());
            match (before, after) {
                (b, Some(a)) if b != Some(a) => batch.push(HostOp::PortPut(key, a)),
                (Some(_), None) => batch.push(HostOp::PortDel(key)),
                _ => {}
            }
        }
        for (akey, had) in touched {
            let op = self.entry_op(&akey);
            if matches!(op, HostOp::Del(_)) && !had {
                continue;
            }
            batch.push(op);
        }
        batch.sort_by_key(HostOp::phase);
        ops.extend(batch);
        previous
    }

    /// Rebuilds the index from the pinned entries and overflow entries.
    pub fn restore(
        entries: impl IntoIterator<Item = (BindingKey, HostValue)>,
        extra: impl IntoIterator<Item = (BindingKey, u32)>,
    ) -> Self {
        let mut index = Self::default();
        for (akey, v) in entries {
            let mut e = Entry {
                default: (v.default_destination != NO_DESTINATION).then_some(v.default_destination),
                ..Entry::default()
            };
            for i in 0..HOST_INLINE_PORTS {
                e.inline[i] = (v.ports[i], v.destinations[i]);
            }
            index.count += usize::from(e.default.is_some())
                + e.inline.iter().filter(|&&(p, _)| p != 0).count();
            index.entries.insert(addr_key(&akey), e);
        }
        for (key, d) in extra {
            if let Some(e) = index.entries.get_mut(&addr_key(&key)) {
                e.extra
                    .get_or_insert_default()
                    .insert(u16::from_be_bytes(key.port), d);
                index.count += 1;
            }
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lookup_common::{FAMILY_V4, PROTO_TCP};

    fn key(last: u8, port: u16) -> BindingKey {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, last]);
        BindingKey {
            protocol: PROTO_TCP,
            family: FAMILY_V4,
            port: port.to_be_bytes(),
            addr,
        }
    }

    /// The maps as the program reads them.
    #[derive(Default)]
    struct Plane {
        hosts: FxHashMap<BindingKey, HostValue>,
        extra: FxHashMap<BindingKey, u32>,
    }

    impl Plane {
        fn apply(&mut self, op: &HostOp) {
            match *op {
                HostOp::PortPut(k, d) => {
                    self.extra.insert(k, d);
                }
                HostOp::Put(k, v) => {
                    self.hosts.insert(k, v);
                }
                HostOp::Del(k) => {
                    assert!(self.hosts.remove(&k).is_some(), "deleting absent {k:?}");
                }
                HostOp::PortDel(k) => {
                    assert!(self.extra.remove(&k).is_some(), "deleting absent {k:?}");
                }
            }
        }
        fn lookup(&self, k: &BindingKey) -> Option<u32> {
            let port = u16::from_be_bytes(k.port);
            let v = self.hosts.get(&addr_key(k))?;
            for i in 0..HOST_INLINE_PORTS {
                if v.ports[i] != 0 && v.ports[i] == port {
                    return Some(v.destinations[i]);
                }
            }
            if v.more != 0
                && let Some(&d) = self.extra.get(k)
            {
                return Some(d);
            }
            (v.default_destination != NO_DESTINATION).then_some(v.default_destination)
        }
    }

    #[test]
    fn single_and_batched_changes_answer_old_or_new() {
        let mut rng = 0x1234_5678_9abc_def1u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut index = HostIndex::default();
        let mut plane = Plane::default();
        let mut truth: FxHashMap<BindingKey, u32> = FxHashMap::default();
        // What the data plane should answer from host bindings alone: the
        // port's binding, else the address's port 0 binding.
        let want = |t: &FxHashMap<BindingKey, u32>, k: &BindingKey| {
            t.get(k).copied().or_else(|| t.get(&addr_key(k)).copied())
        };
        for round in 0..400 {
            let batched = round % 3 == 0;
            let n = if batched { 1 + next(30) } else { 1 };
            let changes: Vec<(BindingKey, Option<u32>)> = (0..n)
                .map(|_| {
                    let k = key(next(3) as u8, [0u16, 1, 2, 3, 4, 5, 6, 7][next(8) as usize]);
                    (k, (next(3) != 0).then(|| next(5) as u32))
                })
                .collect();
            let before = truth.clone();
            for (k, d) in &changes {
                match d {
                    Some(d) => truth.insert(*k, *d),
                    None => truth.remove(k),
                };
            }
            let mut ops = Vec::new();
            if batched {
                index.set_many(&changes, &mut ops);
            } else {
                index.set(&changes[0].0, changes[0].1, &mut ops);
            }
            for step in 0..=ops.len() {
                if step > 0 {
                    plane.apply(&ops[step - 1]);
                }
                for last in 0..3 {
                    for port in 1..9 {
                        let k = key(last, port);
                        let got = plane.lookup(&k);
                        let (old, new) = (want(&before, &k), want(&truth, &k));
                        assert!(
                            got == old || got == new,
                            "round {round} step {step} {k:?}: {got:?} not {old:?}/{new:?}; {ops:?}"
                        );
                        if step == ops.len() {
                            assert_eq!(got, new, "round {round}: final");
                        }
                    }
                }
            }
            assert_eq!(index.len(), truth.len(), "round {round}: count");
            for (k, d) in &truth {
                assert_eq!(index.get(k), Some(*d));
            }
        }
        // A restore from the pinned entries gives the same index.
        let restored = HostIndex::restore(
            plane.hosts.iter().map(|(k, v)| (*k, *v)),
            plane.extra.iter().map(|(k, d)| (*k, *d)),
        );
        assert_eq!(restored.len(), truth.len());
        let mut a: Vec<_> = restored.iter().collect();
        let mut b: Vec<_> = truth.iter().map(|(k, d)| (*k, *d)).collect();
        a.sort_by_key(|(k, _)| (k.addr, k.port));
        b.sort_by_key(|(k, _)| (k.addr, k.port));
        assert_eq!(a, b);
    }
}
