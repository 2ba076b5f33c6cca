//! Which partitions a node should claim or hand back, from one look at the leases and the live
//! nodes: a pure function, so every node decides alike and the tests need no NATS.
//!
//! Each node holds at most its fair share (`ceil(partitions / live nodes)`). Below it, it claims
//! partitions nobody holds (never held, released, or passed by more than the skew margin), in
//! its own rendezvous order (blake3 of node id and partition), so that nodes starting together
//! reach for different partitions first. Above it (a node joined), it hands back the ones it
//! prefers least. A lease that has not passed is never claimed, whoever held it.

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

/// What `view.node_id` should claim and hand back (see the module documentation).
pub fn plan(view: &View) -> Plan {
    let partitions = u32::try_from(view.leases.len()).unwrap_or(u32::MAX);
    let share = crate::lease::fair_share(partitions, view.live) as usize;
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
    if mine.len() > share {
        return Plan { claim: Vec::new(), release: mine.split_off(share) };
    }
    free.truncate(share - mine.len());
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

    #[test]
    fn nodes_prefer_different_partitions() {
        let first = |node: &str| plan(&view(node, 16, vec![None; 16])).claim;
        let picks: std::collections::BTreeSet<u32> =
            ["a", "b", "c", "d", "e"].iter().map(|n| first(n)[0]).collect();
        assert!(picks.len() >= 3, "first picks {picks:?}");
    }
}
