//! A loser tree: which of `k` ordered sequences holds the smallest head, kept up to date in
//! about log2(k) comparisons each time the winner's sequence advances, and no moves.
//!
//! The tree has a leaf per sequence (`k..2k` in heap numbering) and an internal node per match
//! (`1..k`), which keeps the loser of that match; slot 0 keeps the overall winner. When the
//! winner's head changes, only the matches on its path to the root are played again. The
//! caller owns the sequences and says, by index, which of two comes first.

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct LoserTree {
    /// `nodes[0]`: the winner; `nodes[n]` for `1 <= n < k`: the loser of match `n`.
    nodes: Vec<usize>,
}

impl LoserTree {
    /// A tree over sequences `0..k`, ordered by `first(a, b)`: whether sequence `a`'s head comes
    /// before `b`'s. It must be a strict total order (break ties by index).
    pub(crate) fn new(k: usize, first: impl Fn(usize, usize) -> bool) -> Self {
        if k == 0 {
            return LoserTree::default();
        }
        // the winners of every match, built from the leaves up; the losers stay in the tree
        let mut winners = vec![0usize; 2 * k];
        for (i, w) in winners[k..].iter_mut().enumerate() {
            *w = i;
        }
        let mut nodes = vec![0usize; k];
        for n in (1..k).rev() {
            let (a, b) = (winners[2 * n], winners[2 * n + 1]);
            let (w, l) = if first(a, b) { (a, b) } else { (b, a) };
            winners[n] = w;
            nodes[n] = l;
        }
        nodes[0] = if k == 1 { 0 } else { winners[1] };
        LoserTree { nodes }
    }

    /// The sequence whose head comes first (`None` for a tree of no sequences).
    pub(crate) fn winner(&self) -> Option<usize> {
        self.nodes.first().copied()
    }

    /// Plays the winner's matches again after its head changed (or its sequence ended, which
    /// `first` must then put after every other).
    pub(crate) fn replay(&mut self, first: impl Fn(usize, usize) -> bool) {
        let k = self.nodes.len();
        let Some(&(mut winner)) = self.nodes.first() else {
            return;
        };
        let mut n = (winner + k) / 2;
        while n >= 1 {
            if first(self.nodes[n], winner) {
                std::mem::swap(&mut self.nodes[n], &mut winner);
            }
            n /= 2;
        }
        self.nodes[0] = winner;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merges sorted sequences through the tree, the way a reader would.
    fn merge(seqs: &[Vec<u32>]) -> Vec<(u32, usize)> {
        let mut at = vec![0usize; seqs.len()];
        let head = |at: &[usize], i: usize| seqs[i].get(at[i]).copied();
        let first = |at: &[usize], a: usize, b: usize| match (head(at, a), head(at, b)) {
            (Some(x), Some(y)) => (x, a) < (y, b),
            (Some(_), None) => true,
            (None, _) => false,
        };
        let mut tree = LoserTree::new(seqs.len(), |a, b| first(&at, a, b));
        let mut out = Vec::new();
        while let Some(w) = tree.winner() {
            let Some(v) = head(&at, w) else { break };
            out.push((v, w));
            at[w] += 1;
            tree.replay(|a, b| first(&at, a, b));
        }
        out
    }

    #[test]
    fn merges_any_number_of_sequences_in_order_ties_by_index() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for k in 0..40usize {
            let seqs: Vec<Vec<u32>> = (0..k)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let len = (x % 50) as usize;
                    let mut s: Vec<u32> = (0..len).map(|j| ((x >> (j % 40)) % 64) as u32).collect();
                    s.sort_unstable();
                    s
                })
                .collect();
            let mut want: Vec<(u32, usize)> = seqs
                .iter()
                .enumerate()
                .flat_map(|(i, s)| s.iter().map(move |v| (*v, i)))
                .collect();
            want.sort();
            assert_eq!(merge(&seqs), want, "{k} sequences");
        }
    }
}
