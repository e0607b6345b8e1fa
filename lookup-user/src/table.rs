//! Port tables: how bindings wider than a host become data-plane entries
//! that answer a lookup with one trie lookup and one hash lookup.
//!
//! For each (protocol, family), every prefix that carries at least one
//! binding is a node in the trie, and the trie answers a lookup with the
//! longest such prefix P containing the address. Every binding that can match
//! that lookup sits on P or on one of P's ancestors, so the answer depends
//! only on (P, port). The agent therefore gives P a *port table*, computed
//! from P and its ancestors:
//!
//! - `default`: the destination of the longest ancestor-or-self with a port 0
//!   binding (what any port not in the table gets);
//! - one entry per port p bound on P or an ancestor where the winner is a
//!   port-p binding: walking from P towards the root, the first prefix with a
//!   binding for p or for port 0 wins, and at the same prefix p beats 0.
//!   Ports whose winner is a port 0 binding are left out: that winner is
//!   `default` by construction.
//!
//! A change to a binding on Q can change the tables of Q and of prefixes
//! below Q, nothing else. [`Tables::set`] recomputes exactly those and emits
//! the difference as [`Op`]s, ordered so that every lookup sees either its
//! old answer or its new one at every step (see [`Tables::reconcile_prefix`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lookup_common::{BindingKey, NO_DESTINATION, PortKey, PrefixValue};

/// One data-plane write, in the order it must be applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Record a wide binding (control-plane truth, never read by the program).
    WidePut {
        /// Trie data of the prefix, port included.
        key: BindingKey,
        /// Address prefix length.
        len: u8,
        /// Destination.
        destination: u32,
    },
    /// Forget a wide binding.
    WideDel {
        /// Trie data of the prefix, port included.
        key: BindingKey,
        /// Address prefix length.
        len: u8,
    },
    /// Set a port table entry.
    PortPut(PortKey, u32),
    /// Remove a port table entry.
    PortDel(PortKey),
    /// Insert or replace a trie node (trie data has port 0).
    TriePut {
        /// Trie data.
        key: BindingKey,
        /// Address prefix length.
        len: u8,
        /// Table and default.
        value: PrefixValue,
    },
    /// Remove a trie node.
    TrieDel {
        /// Trie data.
        key: BindingKey,
        /// Address prefix length.
        len: u8,
    },
}

/// (protocol, family) as stored in keys.
type SpaceId = (u8, u8);

/// An address left-aligned in 128 bits (IPv4 in the top 32), so masking and
/// ancestry work the same for both families.
type Bits = u128;

fn mask(addr: Bits, len: u8) -> Bits {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

fn from_bits(space: SpaceId, addr: Bits, port: u16) -> BindingKey {
    BindingKey {
        protocol: space.0,
        family: space.1,
        port: port.to_be_bytes(),
        addr: addr.to_be_bytes(),
    }
}

/// The last address under (addr, len).
fn last_under(addr: Bits, len: u8) -> Bits {
    addr | if len == 0 {
        u128::MAX
    } else {
        !(u128::MAX << (128 - u32::from(len)))
    }
}

type Nodes = BTreeMap<(Bits, u8), Node>;

/// The longest proper ancestor of (addr, len) among `nodes`.
fn find_parent(nodes: &Nodes, addr: Bits, len: u8) -> Option<(Bits, u8)> {
    (0..len)
        .rev()
        .map(|l| (mask(addr, l), l))
        .find(|k| nodes.contains_key(k))
}

/// Inserts a node, which becomes the parent of the nodes below it whose
/// parent was above it.
fn insert_node(nodes: &mut Nodes, addr: Bits, len: u8, mut node: Node) {
    node.parent = find_parent(nodes, addr, len);
    for (&(a, l), below) in nodes.range_mut((addr, len)..=(last_under(addr, len), u8::MAX)) {
        if l > len && mask(a, len) == addr && below.parent.is_none_or(|(_, pl)| pl < len) {
            below.parent = Some((addr, len));
        }
    }
    nodes.insert((addr, len), node);
}

/// Removes a node; the nodes whose parent it was get its parent.
fn remove_node(nodes: &mut Nodes, addr: Bits, len: u8) -> Option<Node> {
    let node = nodes.remove(&(addr, len))?;
    for (_, below) in nodes.range_mut((addr, len)..=(last_under(addr, len), u8::MAX)) {
        if below.parent == Some((addr, len)) {
            below.parent = node.parent;
        }
    }
    Some(node)
}

/// The table of a prefix with `bindings`, from the table of its parent:
/// its own port 0 binding, or the parent's default; its own specific
/// ports, and unless it has a port 0 binding (which beats every ancestor's)
/// the parent's specific ports too.
fn derive(bindings: &BTreeMap<u16, u32>, parent: Option<&Installed>) -> Installed {
    let own_default = bindings.get(&0).copied();
    let mut ports = match (own_default, parent) {
        (None, Some(p)) => p.ports.clone(),
        _ => HashMap::new(),
    };
    ports.extend(
        bindings
            .iter()
            .filter(|&(&p, _)| p != 0)
            .map(|(&p, &d)| (p, d)),
    );
    Installed {
        default: own_default.unwrap_or(parent.map_or(NO_DESTINATION, |p| p.default)),
        ports,
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Installed {
    default: u32,
    ports: HashMap<u16, u32>,
}

#[derive(Debug)]
struct Node {
    /// Bindings on exactly this prefix: port (0 = every port) to destination.
    bindings: BTreeMap<u16, u32>,
    /// Port table id, and what the data plane holds for it.
    table: u32,
    installed: Installed,
    /// Whether the trie holds this node yet.
    in_trie: bool,
    /// The longest proper ancestor that is a node, kept up to date as nodes
    /// come and go, so a table is computed from its few real ancestors
    /// rather than from a probe at every shorter length.
    parent: Option<(Bits, u8)>,
}

impl Node {
    fn new(table: u32) -> Self {
        Self {
            parent: None,
            bindings: BTreeMap::new(),
            table,
            installed: Installed {
                default: NO_DESTINATION,
                ports: HashMap::new(),
            },
            in_trie: false,
        }
    }
}

/// The wide bindings of every (protocol, family) and their port tables.
#[derive(Debug, Default)]
pub struct Tables {
    spaces: HashMap<SpaceId, BTreeMap<(Bits, u8), Node>>,
    free: BTreeSet<u32>,
    next_table: u32,
    /// Bindings held, for sizing and tests.
    bindings: usize,
    /// In a batch: prefixes changed so far; tables are recomputed once, in
    /// [`Tables::finish_batch`].
    batch: Option<HashMap<SpaceId, std::collections::HashSet<(Bits, u8)>>>,
}

impl Tables {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of wide bindings held.
    pub fn len(&self) -> usize {
        self.bindings
    }

    /// Whether no wide binding is held.
    pub fn is_empty(&self) -> bool {
        self.bindings == 0
    }

    /// Number of prefixes in the trie.
    pub fn prefixes(&self) -> usize {
        self.spaces.values().map(BTreeMap::len).sum()
    }

    /// Whether no prefix holds table `table`.
    pub fn is_free(&self, table: u32) -> bool {
        table >= self.next_table || self.free.contains(&table)
    }

    fn alloc_table(&mut self) -> u32 {
        if let Some(id) = self.free.pop_first() {
            return id;
        }
        self.next_table += 1;
        self.next_table - 1
    }

    /// Sets (`Some`) or removes (`None`) the binding of `key` (whose port is
    /// the binding's port) with address prefix length `len`, appending the
    /// data-plane writes to `ops`. Returns the destination it replaced.
    pub fn set(
        &mut self,
        key: &BindingKey,
        len: u8,
        destination: Option<u32>,
        ops: &mut Vec<Op>,
    ) -> Option<u32> {
        let space: SpaceId = (key.protocol, key.family);
        let addr = mask(u128::from_be_bytes(key.addr), len);
        let port = u16::from_be_bytes(key.port);
        let truth_key = from_bits(space, addr, port);
        match destination {
            Some(dest) => {
                let exists = self
                    .spaces
                    .get(&space)
                    .is_some_and(|n| n.contains_key(&(addr, len)));
                if !exists {
                    let table = self.alloc_table();
                    let nodes = self.spaces.entry(space).or_default();
                    insert_node(nodes, addr, len, Node::new(table));
                }
                let node = self.node_mut(space, addr, len);
                let previous = node.bindings.insert(port, dest);
                if previous == Some(dest) {
                    return previous;
                }
                if previous.is_none() {
                    self.bindings += 1;
                }
                ops.push(Op::WidePut {
                    key: truth_key,
                    len,
                    destination: dest,
                });
                if let Some(changed) = &mut self.batch {
                    changed.entry(space).or_default().insert((addr, len));
                } else {
                    self.refresh_below(space, addr, len, true, ops);
                }
                previous
            }
            None => {
                let nodes = self.spaces.get_mut(&space)?;
                let node = nodes.get_mut(&(addr, len))?;
                let previous = node.bindings.remove(&port)?;
                self.bindings -= 1;
                ops.push(Op::WideDel {
                    key: truth_key,
                    len,
                });
                if let Some(changed) = &mut self.batch {
                    // An emptied node stays until finish_batch unhooks it.
                    changed.entry(space).or_default().insert((addr, len));
                    return Some(previous);
                }
                if node.bindings.is_empty() {
                    // Unhook the node first: its lookups fall to its parent,
                    // whose table this binding never touched.
                    let node = remove_node(nodes, addr, len).expect("present");
                    ops.push(Op::TrieDel {
                        key: from_bits(space, addr, 0),
                        len,
                    });
                    for &p in node.installed.ports.keys() {
                        ops.push(Op::PortDel(PortKey::new(node.table, p)));
                    }
                    self.free.insert(node.table);
                    self.refresh_below(space, addr, len, false, ops);
                } else {
                    self.refresh_below(space, addr, len, true, ops);
                }
                Some(previous)
            }
        }
    }

    /// Starts a batch: [`Tables::set`] records bindings but defers the
    /// tables until [`Tables::finish_batch`], so a prefix below many changes
    /// is recomputed once.
    pub fn begin_batch(&mut self) {
        self.batch = Some(HashMap::new());
    }

    /// Ends a batch: recomputes every table under a changed prefix, then
    /// unhooks prefixes left without bindings, in an order where every
    /// lookup gets its old or its new answer at each step (see the body).
    pub fn finish_batch(&mut self, ops: &mut Vec<Op>) {
        let Some(changed) = self.batch.take() else {
            return;
        };
        for (space, prefixes) in changed {
            let Some(nodes) = self.spaces.get(&space) else {
                continue;
            };
            // Every node at or under a changed prefix, found by range scans
            // (cost follows what changed, not the size of the trie). In
            // address order an ancestor comes before what it covers, so a
            // prefix inside one already scanned is skipped: each node is
            // visited once however many of its ancestors changed.
            let mut prefixes: Vec<(Bits, u8)> = prefixes.into_iter().collect();
            prefixes.sort_unstable();
            let mut scanned = Vec::new();
            let mut covered: Option<Bits> = None;
            for (addr, len) in prefixes {
                if covered.is_some_and(|end| addr <= end) {
                    continue;
                }
                let last = last_under(addr, len);
                covered = Some(last);
                for (&(a, l), _) in nodes.range((addr, len)..=(last, u8::MAX)) {
                    if l >= len && mask(a, len) == addr {
                        scanned.push((a, l));
                    }
                }
            }
            // The new tables, each from its parent's: in address order a
            // parent comes before its children, and a parent not scanned is
            // unchanged, so what it has installed is what it should have.
            let mut wants: HashMap<(Bits, u8), Installed> = HashMap::with_capacity(scanned.len());
            for &key in &scanned {
                let node = &nodes[&key];
                let parent = node
                    .parent
                    .map(|p| wants.get(&p).unwrap_or_else(|| &nodes[&p].installed));
                let want = derive(&node.bindings, parent);
                wants.insert(key, want);
            }
            let (dirty, mut doomed): (Vec<_>, Vec<_>) = scanned
                .into_iter()
                .partition(|key| !nodes[key].bindings.is_empty());
            let mut dirty = dirty;
            // New prefixes first, longest first: a lookup under a new prefix
            // must never land on a new ancestor, or on an updated existing
            // one, before the new prefix that answers it is in place. Then
            // the existing prefixes; then the emptied ones go, shortest
            // first, so a lookup falls only onto prefixes already in their
            // new state.
            dirty.sort_by_key(|&(addr, len)| {
                let new = !nodes[&(addr, len)].in_trie;
                (!new, std::cmp::Reverse(len))
            });
            doomed.sort_by_key(|&(_, len)| len);
            // New prefixes are invisible until their trie node goes in, so
            // their port entries can all go first; their nodes then go in
            // the order above. Existing prefixes are updated after all new
            // ones are in, and each is looked up on its own, so their
            // writes group by kind too.
            let mut writes = Writes::default();
            let mut new_ones = true;
            for (addr, len) in dirty {
                let want = wants.remove(&(addr, len)).expect("computed above");
                if new_ones && self.spaces[&space][&(addr, len)].in_trie {
                    new_ones = false;
                    writes.drain_into(ops);
                }
                self.install_into(space, addr, len, want, &mut writes);
            }
            writes.drain_into(ops);
            let nodes = self.spaces.get_mut(&space).expect("space exists");
            let mut freed = Vec::new();
            for &(addr, len) in &doomed {
                let node = remove_node(nodes, addr, len).expect("doomed node");
                if node.in_trie {
                    ops.push(Op::TrieDel {
                        key: from_bits(space, addr, 0),
                        len,
                    });
                }
                freed.push(node);
            }
            for node in freed {
                for &p in node.installed.ports.keys() {
                    ops.push(Op::PortDel(PortKey::new(node.table, p)));
                }
                self.free.insert(node.table);
            }
        }
    }

    fn node_mut(&mut self, space: SpaceId, addr: Bits, len: u8) -> &mut Node {
        self.spaces
            .get_mut(&space)
            .and_then(|n| n.get_mut(&(addr, len)))
            .expect("node exists")
    }

    /// Recomputes the tables of (addr, len) (if `include_self`) and of
    /// every prefix below it.
    fn refresh_below(
        &mut self,
        space: SpaceId,
        addr: Bits,
        len: u8,
        include_self: bool,
        ops: &mut Vec<Op>,
    ) {
        let Some(nodes) = self.spaces.get(&space) else {
            return;
        };
        let last = addr
            | if len == 0 {
                u128::MAX
            } else {
                !(u128::MAX << (128 - u32::from(len)))
            };
        let affected: Vec<(Bits, u8)> = nodes
            .range((addr, 0)..=(last, u8::MAX))
            .map(|(k, _)| *k)
            .filter(|&(a, l)| l > len || (include_self && l == len && a == addr))
            .filter(|&(a, l)| l >= len && mask(a, len) == addr)
            .collect();
        for (a, l) in affected {
            self.reconcile_prefix(space, a, l, ops);
        }
    }

    /// What the table of (addr, len) should hold.
    fn desired(nodes: &Nodes, addr: Bits, len: u8) -> Installed {
        // The prefix and its ancestors that carry bindings, longest first.
        let mut chain: Vec<&BTreeMap<u16, u32>> = Vec::new();
        let mut next = Some((addr, len));
        while let Some(key) = next {
            let node = &nodes[&key];
            chain.push(&node.bindings);
            next = node.parent;
        }
        let default = chain
            .iter()
            .find_map(|b| b.get(&0).copied())
            .unwrap_or(NO_DESTINATION);
        let mut ports = HashMap::new();
        let all: BTreeSet<u16> = chain
            .iter()
            .flat_map(|b| b.keys().copied())
            .filter(|&p| p != 0)
            .collect();
        for p in all {
            for b in &chain {
                if let Some(&d) = b.get(&p) {
                    ports.insert(p, d);
                    break;
                }
                if b.contains_key(&0) {
                    break;
                }
            }
        }
        Installed { default, ports }
    }

    /// Brings the data plane's table of one prefix to what it should hold.
    ///
    /// A lookup that lands on this prefix reads one port entry and, if it is
    /// absent, the default carried by the trie node. The writes go: new or
    /// changed port entries, then the trie node (new default, or the node
    /// itself if it is new), then removals of entries no longer wanted. At
    /// every step each lookup gets its old answer or its new one: a port
    /// entry is only removed once the default it falls back to is the new
    /// one, and a new node becomes visible only with its table complete.
    fn reconcile_prefix(&mut self, space: SpaceId, addr: Bits, len: u8, ops: &mut Vec<Op>) {
        let nodes = self.spaces.get(&space).expect("space exists");
        let want = Self::desired(nodes, addr, len);
        self.install(space, addr, len, want, ops);
    }

    /// Writes the table `want` for one prefix (see
    /// [`Tables::reconcile_prefix`]).
    fn install(&mut self, space: SpaceId, addr: Bits, len: u8, want: Installed, ops: &mut Vec<Op>) {
        let mut writes = Writes::default();
        self.install_into(space, addr, len, want, &mut writes);
        writes.drain_into(ops);
    }

    /// [`Tables::install`], with the writes sorted by kind into `writes`:
    /// for one prefix, its new port entries go before its trie node, and
    /// removed entries after, whatever other prefixes' writes go between.
    fn install_into(
        &mut self,
        space: SpaceId,
        addr: Bits,
        len: u8,
        want: Installed,
        writes: &mut Writes,
    ) {
        let nodes = self.spaces.get_mut(&space).expect("space exists");
        let node = nodes.get_mut(&(addr, len)).expect("node exists");
        let fresh = !node.in_trie;
        let table = node.table;
        for (&p, &d) in &want.ports {
            if node.installed.ports.get(&p) != Some(&d) {
                writes.ports.push(Op::PortPut(PortKey::new(table, p), d));
            }
        }
        if fresh || node.installed.default != want.default {
            writes.trie.push(Op::TriePut {
                key: from_bits(space, addr, 0),
                len,
                value: PrefixValue {
                    table,
                    default_destination: want.default,
                },
            });
        }
        for &p in node.installed.ports.keys() {
            if !want.ports.contains_key(&p) {
                writes.removals.push(Op::PortDel(PortKey::new(table, p)));
            }
        }
        node.installed = want;
        node.in_trie = true;
    }
}

/// Writes for a set of prefixes whose lookups are independent of each
/// other's writes, grouped by kind so that each group is one batched call:
/// every prefix's new port entries, then the trie nodes, then the port
/// entries no longer wanted. Each prefix still sees its own three in that
/// order.
#[derive(Default)]
struct Writes {
    ports: Vec<Op>,
    trie: Vec<Op>,
    removals: Vec<Op>,
}

impl Writes {
    fn drain_into(&mut self, ops: &mut Vec<Op>) {
        ops.append(&mut self.ports);
        ops.append(&mut self.trie);
        ops.append(&mut self.removals);
    }
}

/// A pinned trie node, as [`Tables::restore`] reads it back.
pub type TrieEntry = (BindingKey, u8, PrefixValue);

impl Tables {
    /// Rebuilds the tables from what is pinned: the wide bindings (the
    /// truth) and the trie and port entries derived from them. Appends to
    /// `ops` whatever repairs the derived state, which is nothing unless an
    /// agent died in the middle of a change.
    pub fn restore(
        wide: impl IntoIterator<Item = (BindingKey, u8, u32)>,
        trie: impl IntoIterator<Item = TrieEntry>,
        ports: impl IntoIterator<Item = (PortKey, u32)>,
        ops: &mut Vec<Op>,
    ) -> Self {
        let mut t = Self::new();
        let mut by_table: HashMap<u32, HashMap<u16, u32>> = HashMap::new();
        for (k, d) in ports {
            by_table.entry(k.table).or_default().insert(k.port, d);
        }
        for (key, len, dest) in wide {
            let space = (key.protocol, key.family);
            let addr = mask(u128::from_be_bytes(key.addr), len);
            let node = t
                .spaces
                .entry(space)
                .or_default()
                .entry((addr, len))
                .or_insert_with(|| Node::new(u32::MAX));
            if node
                .bindings
                .insert(u16::from_be_bytes(key.port), dest)
                .is_none()
            {
                t.bindings += 1;
            }
        }
        for nodes in t.spaces.values_mut() {
            let keys: Vec<(Bits, u8)> = nodes.keys().copied().collect();
            for (addr, len) in keys {
                let parent = find_parent(nodes, addr, len);
                nodes.get_mut(&(addr, len)).expect("listed").parent = parent;
            }
        }
        let mut used: BTreeSet<u32> = by_table.keys().copied().collect();
        for (key, len, value) in trie {
            let space = (key.protocol, key.family);
            let addr = mask(u128::from_be_bytes(key.addr), len);
            used.insert(value.table);
            match t
                .spaces
                .get_mut(&space)
                .and_then(|n| n.get_mut(&(addr, len)))
            {
                Some(node) if node.table == u32::MAX => {
                    node.table = value.table;
                    node.in_trie = true;
                    node.installed = Installed {
                        default: value.default_destination,
                        ports: by_table.remove(&value.table).unwrap_or_default(),
                    };
                }
                _ => ops.push(Op::TrieDel {
                    key: from_bits(space, addr, 0),
                    len,
                }),
            }
        }
        t.next_table = used.last().map_or(0, |m| m + 1);
        t.free = (0..t.next_table).filter(|id| !used.contains(id)).collect();
        let mut all = Vec::new();
        for (&space, nodes) in &t.spaces {
            for &(addr, len) in nodes.keys() {
                all.push((space, addr, len));
            }
        }
        for &(space, addr, len) in &all {
            if t.node_mut(space, addr, len).table == u32::MAX {
                let id = t.alloc_table();
                t.node_mut(space, addr, len).table = id;
            }
        }
        for (space, addr, len) in all {
            t.reconcile_prefix(space, addr, len, ops);
        }
        // Entries of tables no node owns.
        for (table, ports) in by_table {
            for p in ports.keys() {
                ops.push(Op::PortDel(PortKey::new(table, *p)));
            }
        }
        t
    }

    /// What the data plane answers for a lookup that missed the host table,
    /// computed from the installed tables: the longest prefix in the trie,
    /// then its port entry or its default. For tests and tools.
    pub fn lookup(&self, protocol: u8, family: u8, addr: [u8; 16], port: u16) -> Option<u32> {
        let nodes = self.spaces.get(&(protocol, family))?;
        let bits = if family == lookup_common::FAMILY_V4 {
            32
        } else {
            128
        };
        let addr = u128::from_be_bytes(addr);
        let node = (0..=bits)
            .rev()
            .find_map(|l| nodes.get(&(mask(addr, l), l)).filter(|n| n.in_trie))?;
        match node.installed.ports.get(&port) {
            Some(&d) => Some(d),
            None => (node.installed.default != NO_DESTINATION).then_some(node.installed.default),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Tables {
        /// Every node's parent is its longest proper ancestor among nodes.
        fn assert_parents(&self) {
            for nodes in self.spaces.values() {
                for (&(addr, len), node) in nodes {
                    assert_eq!(
                        node.parent,
                        find_parent(nodes, addr, len),
                        "parent of {addr:x}/{len}"
                    );
                }
            }
        }
    }
    use lookup_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};

    /// The maps as the program sees them, changed one op at a time.
    #[derive(Default)]
    struct Plane {
        trie: HashMap<(u8, u8, Bits, u8), PrefixValue>,
        ports: HashMap<PortKey, u32>,
    }

    impl Plane {
        fn apply(&mut self, op: &Op) {
            match *op {
                Op::WidePut { .. } | Op::WideDel { .. } => {}
                Op::PortPut(k, d) => {
                    self.ports.insert(k, d);
                }
                Op::PortDel(k) => {
                    assert!(self.ports.remove(&k).is_some(), "deleting absent {k:?}");
                }
                Op::TriePut { key, len, value } => {
                    self.trie.insert(
                        (key.protocol, key.family, u128::from_be_bytes(key.addr), len),
                        value,
                    );
                }
                Op::TrieDel { key, len } => {
                    assert!(
                        self.trie
                            .remove(&(key.protocol, key.family, u128::from_be_bytes(key.addr), len))
                            .is_some(),
                        "deleting absent trie node"
                    );
                }
            }
        }

        fn lookup(&self, protocol: u8, family: u8, addr: Bits, port: u16) -> Option<u32> {
            let bits = if family == FAMILY_V4 { 32 } else { 128 };
            let v = (0..=bits)
                .rev()
                .find_map(|l| self.trie.get(&(protocol, family, mask(addr, l), l)))?;
            match self.ports.get(&PortKey::new(v.table, port)) {
                Some(&d) => Some(d),
                None => (v.default_destination != NO_DESTINATION).then_some(v.default_destination),
            }
        }
    }

    /// The rules, by brute force over the bindings.
    fn reference(
        b: &HashMap<(u8, u8, Bits, u8, u16), u32>,
        protocol: u8,
        family: u8,
        addr: Bits,
        port: u16,
    ) -> Option<u32> {
        b.iter()
            .filter(|&(&(p, f, a, l, bp), _)| {
                p == protocol && f == family && mask(addr, l) == a && (bp == 0 || bp == port)
            })
            .max_by_key(|&(&(_, _, _, l, bp), _)| (l, bp != 0))
            .map(|(_, &d)| d)
    }

    use crate::bench::Rng;

    fn random_addr(rng: &mut Rng, family: u8) -> Bits {
        if family == FAMILY_V4 {
            u128::from(
                0x0a00_0000u32
                    | (rng.below(4) as u32) << 16
                    | (rng.below(4) as u32) << 8
                    | rng.below(8) as u32,
            ) << 96
        } else {
            0x2001_0db8u128 << 96 | u128::from(rng.below(4)) << 64 | u128::from(rng.below(8))
        }
    }

    /// A wide prefix of either family, overlapping others often.
    fn random_prefix(rng: &mut Rng) -> (u8, Bits, u8) {
        let family = if rng.below(3) == 0 {
            FAMILY_V6
        } else {
            FAMILY_V4
        };
        let lens: &[u8] = if family == FAMILY_V4 {
            &[0, 8, 16, 22, 24, 29, 31]
        } else {
            &[0, 32, 48, 64, 100, 127]
        };
        let len = lens[rng.below(lens.len() as u64) as usize];
        (family, mask(random_addr(rng, family), len), len)
    }

    #[test]
    fn batches_answer_old_or_new_at_every_step() {
        for seed in 1..=10u64 {
            let mut rng = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
            let mut t = Tables::new();
            let mut plane = Plane::default();
            let mut flat: HashMap<(u8, u8, Bits, u8, u16), u32> = HashMap::new();
            for round in 0..15 {
                let before = flat.clone();
                let mut ops = Vec::new();
                t.begin_batch();
                for _ in 0..40 {
                    let (family, addr, len) = random_prefix(&mut rng);
                    let port = [0u16, 0, 80, 443][rng.below(4) as usize];
                    let dest = if rng.below(3) == 0 {
                        None
                    } else {
                        Some(rng.below(5) as u32)
                    };
                    match dest {
                        Some(d) => flat.insert((PROTO_TCP, family, addr, len, port), d),
                        None => flat.remove(&(PROTO_TCP, family, addr, len, port)),
                    };
                    t.set(
                        &from_bits((PROTO_TCP, family), addr, port),
                        len,
                        dest,
                        &mut ops,
                    );
                }
                t.finish_batch(&mut ops);
                t.assert_parents();
                let probes: Vec<(u8, Bits, u16)> = (0..60)
                    .map(|_| {
                        let family = if rng.below(3) == 0 {
                            FAMILY_V6
                        } else {
                            FAMILY_V4
                        };
                        (
                            family,
                            random_addr(&mut rng, family),
                            [80u16, 443, 22][rng.below(3) as usize],
                        )
                    })
                    .collect();
                for step in 0..=ops.len() {
                    if step > 0 {
                        plane.apply(&ops[step - 1]);
                    }
                    for &(f, a, p) in &probes {
                        let got = plane.lookup(PROTO_TCP, f, a, p);
                        let old = reference(&before, PROTO_TCP, f, a, p);
                        let new = reference(&flat, PROTO_TCP, f, a, p);
                        assert!(
                            got == old || got == new,
                            "seed {seed} round {round} step {step}: {a:x}:{p} got {got:?} old {old:?} new {new:?}"
                        );
                        if step == ops.len() {
                            assert_eq!(got, new, "seed {seed} round {round}: final");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_step_of_every_change_answers_old_or_new() {
        for seed in 1..=20u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut t = Tables::new();
            let mut plane = Plane::default();
            let mut flat: HashMap<(u8, u8, Bits, u8, u16), u32> = HashMap::new();
            for _ in 0..300 {
                let protocol = if rng.below(4) == 0 {
                    PROTO_UDP
                } else {
                    PROTO_TCP
                };
                let (family, addr, len) = random_prefix(&mut rng);
                let port = [0u16, 0, 80, 443, 8080][rng.below(5) as usize];
                let dest = if rng.below(3) == 0 {
                    None
                } else {
                    Some(rng.below(6) as u32)
                };
                let key = from_bits((protocol, family), addr, port);

                let before = flat.clone();
                match dest {
                    Some(d) => flat.insert((protocol, family, addr, len, port), d),
                    None => flat.remove(&(protocol, family, addr, len, port)),
                };
                let mut ops = Vec::new();
                t.set(&key, len, dest, &mut ops);
                t.assert_parents();
                // Probe lookups under the changed prefix and around it.
                let probes: Vec<(Bits, u16)> = (0..12)
                    .map(|_| {
                        let a = if rng.below(2) == 0 {
                            addr | (u128::from(rng.below(256))
                                << if family == FAMILY_V4 { 96 } else { 0 })
                        } else {
                            random_addr(&mut rng, family)
                        };
                        (a, [80u16, 443, 8080, 22][rng.below(4) as usize])
                    })
                    .collect();
                for step in 0..=ops.len() {
                    if step > 0 {
                        plane.apply(&ops[step - 1]);
                    }
                    for &(a, p) in &probes {
                        let got = plane.lookup(protocol, family, a, p);
                        let old = reference(&before, protocol, family, a, p);
                        let new = reference(&flat, protocol, family, a, p);
                        assert!(
                            got == old || got == new,
                            "seed {seed}: step {step}/{} of {:?}: lookup {a:x}:{p} got {got:?}, old {old:?}, new {new:?}",
                            ops.len(),
                            ops
                        );
                        if step == ops.len() {
                            assert_eq!(got, new, "seed {seed}: final state");
                            assert_eq!(t.lookup(protocol, family, a.to_be_bytes(), p), new);
                        }
                    }
                }
            }
            assert_eq!(t.len(), flat.len());

            // A restore from the pinned state needs no repair...
            let wide: Vec<_> = flat
                .iter()
                .map(|(&(p, f, a, l, port), &d)| (from_bits((p, f), a, port), l, d))
                .collect();
            let trie: Vec<TrieEntry> = plane
                .trie
                .iter()
                .map(|(&(p, f, a, l), &v)| (from_bits((p, f), a, 0), l, v))
                .collect();
            let ports: Vec<_> = plane.ports.iter().map(|(&k, &d)| (k, d)).collect();
            let mut ops = Vec::new();
            let restored = Tables::restore(wide.clone(), trie.clone(), ports.clone(), &mut ops);
            assert_eq!(
                ops,
                vec![],
                "seed {seed}: a consistent state needs no repair"
            );
            assert_eq!(restored.len(), flat.len());
            restored.assert_parents();

            // ...and repairs a derived state that lost entries.
            let half: Vec<_> = ports.iter().copied().step_by(2).collect();
            let mut ops = Vec::new();
            Tables::restore(wide, trie.iter().copied().skip(1), half.clone(), &mut ops);
            let mut repaired = Plane::default();
            for (k, l, v) in trie.iter().skip(1) {
                repaired
                    .trie
                    .insert((k.protocol, k.family, u128::from_be_bytes(k.addr), *l), *v);
            }
            repaired.ports = half.into_iter().collect();
            for op in &ops {
                repaired.apply(op);
            }
            for _ in 0..500 {
                let protocol = if rng.below(4) == 0 {
                    PROTO_UDP
                } else {
                    PROTO_TCP
                };
                let family = if rng.below(3) == 0 {
                    FAMILY_V6
                } else {
                    FAMILY_V4
                };
                let a = random_addr(&mut rng, family);
                let p = [80u16, 443, 8080, 22][rng.below(4) as usize];
                assert_eq!(
                    repaired.lookup(protocol, family, a, p),
                    reference(&flat, protocol, family, a, p),
                    "seed {seed}: after repair"
                );
            }
        }
    }
}
