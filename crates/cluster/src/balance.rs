//! Which partitions a node should claim or hand back, from one look at the leases and the live
//! nodes: a pure function, so every node decides alike and the tests need no NATS.
//!
//! The nodes spread the partitions evenly: each holds `floor(partitions / live)` or one more,
//! and only `partitions % live` of them one more (`ceil` is the fair share). A node claims
//! partitions nobody holds (never held, released, or passed by more than the skew margin), in
//! its own rendezvous order (blake3 of node id and partition), so that nodes starting together
//! reach for different partitions first: up to the floor, and up to the ceiling only while no
//! other node is below the floor and fewer than `partitions % live` others are at it. A node
//! hands back the ones it prefers least: what is over the ceiling, and one more when a live
//! node is below the floor and too many nodes are at the ceiling (those past the first
//! `partitions % live` in node id order give one each), so a joining node gets an even share
//! (17 over 4 nodes: 5/4/4/4, not 5/5/5/2). A lease that has not passed is never claimed,
//! whoever held it.

use std::collections::BTreeMap;

use crate::lease::Lease;

/// One node's look at the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub node_id: String,
    /// Live nodes, this one included.
    pub live: usize,
    /// Each partition's lease, by partition number (`None`: never held).
    pub leases: Vec<Option<Lease>>,
    pub now_ms: u64,
    pub skew_margin_ms: u64,
}

/// What a node should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Partitions to claim (take over), in the order to try them.
    pub claim: Vec<u32>,
    /// Partitions this node holds and should hand back.
    pub release: Vec<u32>,
}

/// This node's preference for `partition`: higher first.
fn preference(node_id: &str, partition: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(node_id.as_bytes());
    h.update(&partition.to_be_bytes());
    u64::from_be_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// How the partitions are spread, as one node sees it.
struct Spread<'a> {
    /// `floor(partitions / live)`, its ceiling, and how many nodes may hold the ceiling.
    floor: usize,
    ceil: usize,
    extras: usize,
    /// What each other holder of an unexpired lease holds.
    others: BTreeMap<&'a str, usize>,
    /// Whether another live node holds fewer than the floor (one holding nothing counts).
    other_below: bool,
}

impl<'a> Spread<'a> {
    fn of(view: &'a View, partitions: u32) -> Spread<'a> {
        let live = view.live.max(1);
        let floor = partitions as usize / live;
        let mut others: BTreeMap<&str, usize> = BTreeMap::new();
        for lease in view.leases.iter().flatten() {
            if lease.node_id != view.node_id
                && view.now_ms <= lease.lease_until_ms.saturating_add(view.skew_margin_ms)
            {
                *others.entry(lease.node_id.as_str()).or_default() += 1;
            }
        }
        // Live nodes holding nothing (the holders may include a dead node whose lease runs on).
        let idle = live.saturating_sub(1 + others.len());
        let other_below = (floor > 0 && idle > 0) || others.values().any(|&n| n < floor);
        Spread {
            floor,
            ceil: crate::lease::fair_share(partitions, live) as usize,
            extras: partitions as usize % live,
            others,
            other_below,
        }
    }

    /// Whether `node`, holding the ceiling, is past the first `extras` nodes at it (by id).
    fn past_the_extras(&self, node: &str) -> bool {
        let before = self.others.iter().filter(|(&n, &held)| held >= self.ceil && n < node).count();
        before >= self.extras
    }

    /// How many partitions a node holding `mine` should hold after claiming.
    fn claim_target(&self, mine: usize) -> usize {
        let others_at_ceil = self.others.values().filter(|&&n| n >= self.ceil).count();
        if mine < self.floor {
            self.floor
        } else if !self.other_below && others_at_ceil < self.extras {
            self.ceil
        } else {
            mine
        }
    }
}

/// What `view.node_id` should claim and hand back (see the module documentation).
pub fn plan(view: &View) -> Plan {
    let partitions = u32::try_from(view.leases.len()).unwrap_or(u32::MAX);
    let spread = Spread::of(view, partitions);
    let mut mine = Vec::new();
    let mut free = Vec::new();
    for (partition, lease) in (0..partitions).zip(&view.leases) {
        match lease {
            Some(l) if l.node_id == view.node_id && l.lease_until_ms >= view.now_ms => mine.push(partition),
            Some(l) if view.now_ms <= l.lease_until_ms.saturating_add(view.skew_margin_ms) => {}
            _ => free.push(partition),
        }
    }
    let by_preference =
        |list: &mut Vec<u32>| list.sort_by_key(|&p| std::cmp::Reverse(preference(&view.node_id, p)));
    by_preference(&mut mine);
    by_preference(&mut free);
    if mine.len() > spread.ceil {
        return Plan { claim: Vec::new(), release: mine.split_off(spread.ceil) };
    }
    if spread.extras > 0
        && mine.len() == spread.ceil
        && spread.other_below
        && spread.past_the_extras(&view.node_id)
    {
        return Plan { claim: Vec::new(), release: mine.split_off(spread.floor) };
    }
    free.truncate(spread.claim_target(mine.len()).saturating_sub(mine.len()));
    Plan { claim: free, release: Vec::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, until: u64) -> Option<Lease> {
        Some(Lease { node_id: node.into(), epoch: 1, lease_until_ms: until, advertise: String::new() })
    }

    fn view(node: &str, live: usize, leases: Vec<Option<Lease>>) -> View {
        View { node_id: node.into(), live, leases, now_ms: 1_000, skew_margin_ms: 100 }
    }

    #[test]
    fn a_node_alone_claims_every_partition_nobody_holds() {
        let plan = plan(&view("a", 1, vec![None; 4]));
        assert_eq!(plan.release, Vec::<u32>::new());
        let mut claimed = plan.claim.clone();
        claimed.sort();
        assert_eq!(claimed, vec![0, 1, 2, 3]);
    }

    #[test]
    fn a_live_lease_is_never_claimed_and_a_passed_one_only_after_the_margin() {
        // 0: b's, live; 1: b's, passed but within the margin; 2: passed; 3: released.
        let leases = vec![lease("b", 2_000), lease("b", 950), lease("b", 800), lease("b", 0)];
        let mut claim = plan(&view("a", 2, leases)).claim;
        claim.sort();
        assert_eq!(claim, vec![2, 3]);
    }

    #[test]
    fn a_node_claims_up_to_its_share_and_hands_back_what_is_over_it() {
        // a holds all 4; b joined: a's share is 2, so it hands back 2, those it prefers least.
        let leases = vec![lease("a", 2_000); 4];
        let plan_a = plan(&view("a", 2, leases.clone()));
        assert_eq!(plan_a.claim, Vec::<u32>::new());
        assert_eq!(plan_a.release.len(), 2);
        let kept: Vec<u32> = (0..4).filter(|p| !plan_a.release.contains(p)).collect();
        assert!(kept
            .iter()
            .all(|&k| plan_a.release.iter().all(|&r| preference("a", k) > preference("a", r))));
        // b, while a still holds them, claims nothing; once released, it takes its share.
        assert_eq!(plan(&view("b", 2, leases.clone())), Plan::default());
        let mut after = leases;
        for &p in &plan_a.release {
            after[p as usize] = lease("a", 0);
        }
        let mut claim = plan(&view("b", 2, after)).claim;
        claim.sort();
        let mut released = plan_a.release.clone();
        released.sort();
        assert_eq!(claim, released);
    }

    /// Every node plans in turn (claims granted, hand-backs released) until nothing changes;
    /// returns how many each holds. A partition is never held by two nodes.
    fn settle(nodes: &[&str], leases: &mut [Option<Lease>]) -> Vec<usize> {
        for _ in 0..100 {
            let mut changed = false;
            for node in nodes {
                let plan = plan(&view(node, nodes.len(), leases.to_vec()));
                for p in plan.release {
                    leases[p as usize] = lease(node, 0);
                    changed = true;
                }
                for p in plan.claim {
                    assert!(leases[p as usize].as_ref().is_none_or(|l| l.lease_until_ms < 1_000), "{p} held");
                    leases[p as usize] = lease(node, 5_000);
                    changed = true;
                }
            }
            if !changed {
                return nodes
                    .iter()
                    .map(|n| {
                        leases.iter().flatten().filter(|l| l.node_id == *n && l.lease_until_ms > 0).count()
                    })
                    .collect();
            }
        }
        panic!("no steady state: {leases:?}");
    }

    #[test]
    fn the_partitions_spread_evenly_at_the_start_and_when_a_node_joins_or_leaves() {
        for total in [1usize, 2, 5, 7, 17] {
            for n in 1..=5usize {
                let names = ["a", "b", "c", "d", "e"];
                let mut leases = vec![None; total];
                let mut held = settle(&names[..n], &mut leases);
                held.sort();
                let (floor, extras) = (total / n, total % n);
                let mut even = vec![floor; n - extras];
                even.extend(vec![floor + 1; extras]);
                assert_eq!(held, even, "{total} partitions over {n} nodes");
                // One more node joins: the spread is even again.
                if n < 5 {
                    let mut held = settle(&names[..=n], &mut leases);
                    held.sort();
                    let (floor, extras) = (total / (n + 1), total % (n + 1));
                    let mut even = vec![floor; n + 1 - extras];
                    even.extend(vec![floor + 1; extras]);
                    assert_eq!(held, even, "{total} partitions, a node joining {n}");
                }
            }
        }
        // 17 partitions (16 and the control) over 4 nodes after a join: 5/4/4/4, not 5/5/5/2.
        let mut leases = vec![None; 17];
        settle(&["a", "b", "c"], &mut leases);
        let mut held = settle(&["a", "b", "c", "d"], &mut leases);
        held.sort();
        assert_eq!(held, vec![4, 4, 4, 5]);
        // A node leaves (its leases passed): the others share its partitions evenly.
        for l in leases.iter_mut().flatten() {
            if l.node_id == "d" {
                l.lease_until_ms = 0;
            }
        }
        let mut held = settle(&["a", "b", "c"], &mut leases);
        held.sort();
        assert_eq!(held, vec![5, 6, 6]);
    }

    #[test]
    fn nodes_prefer_different_partitions() {
        let first = |node: &str| plan(&view(node, 16, vec![None; 16])).claim;
        let picks: std::collections::BTreeSet<u32> =
            ["a", "b", "c", "d", "e"].iter().map(|n| first(n)[0]).collect();
        assert!(picks.len() >= 3, "first picks {picks:?}");
    }
}
