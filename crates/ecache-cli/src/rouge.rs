//! ROUGE-L F1 over whitespace-separated words, as the paper compares a policy's greedy
//! output with the full cache's.

/// Length of the longest common subsequence.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// ROUGE-L F1 (beta = 1) of `candidate` against `reference`; two empty texts score 1.
pub fn rouge_l(candidate: &str, reference: &str) -> f64 {
    let c: Vec<&str> = candidate.split_whitespace().collect();
    let r: Vec<&str> = reference.split_whitespace().collect();
    if c.is_empty() && r.is_empty() {
        return 1.0;
    }
    let lcs = lcs_len(&c, &r) as f64;
    if lcs == 0.0 {
        return 0.0;
    }
    let (p, rec) = (lcs / c.len() as f64, lcs / r.len() as f64);
    2.0 * p * rec / (p + rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_cases() {
        // LCS of "the red circle is left" and "the circle is at the left" = the circle is left (4).
        let f = rouge_l("the red circle is left", "the circle is at the left");
        let (p, r) = (4.0 / 5.0, 4.0 / 6.0);
        assert!((f - 2.0 * p * r / (p + r)).abs() < 1e-12);
        assert_eq!(rouge_l("a b c", "a b c"), 1.0);
        assert_eq!(rouge_l("x y", "a b"), 0.0);
        assert_eq!(rouge_l("", ""), 1.0);
        assert_eq!(rouge_l("", "a"), 0.0);
    }
}
