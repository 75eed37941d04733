//! GetPreferredAllocation: devices on one NUMA node first, then under one PCIe switch.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// A device the kubelet may pick, with its topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The device ID (its PCI address).
    pub id: String,
    /// Its NUMA node.
    pub numa: Option<u32>,
    /// The PCIe switch above it (the switch's upstream port in sysfs), if any.
    pub switch: Option<PathBuf>,
}

/// Pick `size` devices from `available`, keeping `must_include`: the NUMA node that already
/// holds the must-include devices (or the one with the most free devices) first, and within a
/// node the switches that hold the most picked and free devices first. Deterministic.
pub fn preferred(available: &[Candidate], must_include: &[String], size: usize) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::new();
    for m in must_include {
        if !chosen.contains(m) {
            chosen.push(m.clone());
        }
    }
    let info = |id: &str| available.iter().find(|c| c.id == id);
    let mut free: Vec<&Candidate> = available
        .iter()
        .filter(|c| !chosen.contains(&c.id))
        .collect();
    free.sort_by(|a, b| a.id.cmp(&b.id));
    free.dedup_by(|a, b| a.id == b.id);
    while chosen.len() < size && !free.is_empty() {
        // Score NUMA nodes: picked devices there, then free devices there.
        let mut nodes: BTreeMap<Option<u32>, (usize, usize)> = BTreeMap::new();
        for id in &chosen {
            if let Some(c) = info(id) {
                nodes.entry(c.numa).or_default().0 += 1;
            }
        }
        for c in &free {
            nodes.entry(c.numa).or_default().1 += 1;
        }
        let node = nodes
            .iter()
            .filter(|(_, (_, f))| *f > 0)
            .max_by(|(na, (pa, fa)), (nb, (pb, fb))| pa.cmp(pb).then(fa.cmp(fb)).then(nb.cmp(na)))
            .map(|(n, _)| *n)
            .unwrap_or(None);
        // Within the node, the same for switches.
        let mut switches: BTreeMap<Option<PathBuf>, (usize, usize)> = BTreeMap::new();
        for id in &chosen {
            if let Some(c) = info(id).filter(|c| c.numa == node) {
                switches.entry(c.switch.clone()).or_default().0 += 1;
            }
        }
        for c in free.iter().filter(|c| c.numa == node) {
            switches.entry(c.switch.clone()).or_default().1 += 1;
        }
        let switch = switches
            .iter()
            .filter(|(_, (_, f))| *f > 0)
            .max_by(|(sa, (pa, fa)), (sb, (pb, fb))| pa.cmp(pb).then(fa.cmp(fb)).then(sb.cmp(sa)))
            .map(|(s, _)| s.clone())
            .unwrap_or(None);
        let Some(pos) = free
            .iter()
            .position(|c| c.numa == node && c.switch == switch)
        else {
            break;
        };
        chosen.push(free.remove(pos).id.clone());
    }
    chosen.truncate(size.max(must_include.len()));
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: &str, numa: u32, switch: &str) -> Candidate {
        Candidate {
            id: id.into(),
            numa: Some(numa),
            switch: Some(PathBuf::from(switch)),
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_numa_node_is_preferred_over_lower_addresses() {
        // Node 0 has one free device, node 1 has three: two devices come from node 1.
        let avail = [
            c("0000:18:00.0", 0, "s0"),
            c("0000:9a:00.0", 1, "s2"),
            c("0000:ab:00.0", 1, "s3"),
            c("0000:ba:00.0", 1, "s3"),
        ];
        let got = preferred(&avail, &[], 2);
        assert_eq!(got, ids(&["0000:ab:00.0", "0000:ba:00.0"]));
    }

    #[test]
    fn must_include_pulls_its_node_and_switch() {
        let avail = [
            c("0000:18:00.0", 0, "s0"),
            c("0000:2a:00.0", 0, "s1"),
            c("0000:3a:00.0", 0, "s1"),
            c("0000:9a:00.0", 1, "s2"),
            c("0000:ab:00.0", 1, "s2"),
        ];
        let got = preferred(&avail, &ids(&["0000:3a:00.0"]), 2);
        assert_eq!(got, ids(&["0000:3a:00.0", "0000:2a:00.0"]));
    }

    #[test]
    fn spills_to_another_node_when_one_is_not_enough() {
        let avail = [c("0000:18:00.0", 0, "s0"), c("0000:9a:00.0", 1, "s2")];
        let got = preferred(&avail, &[], 2);
        assert_eq!(got.len(), 2);
        assert!(got.contains(&"0000:18:00.0".to_string()));
        assert!(got.contains(&"0000:9a:00.0".to_string()));
    }
}
