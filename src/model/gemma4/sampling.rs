//! Picks the next token from logits: greedy, or temperature with top-k / top-p,
//! reproducible from a seed.

/// How to choose tokens. `temperature <= 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: None, top_p: None, seed: 0 }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: fastrand::Rng,
    /// Scratch space reused across steps: (token, probability).
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = fastrand::Rng::with_seed(params.seed);
        Self { params, rng, candidates: Vec::new() }
    }

    /// The next token. Logits that are NaN never win.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 || logits.len() < 2 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        self.candidates.clear();
        self.candidates.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l / t)));
        if self.candidates.is_empty() {
            return 0;
        }
        // Highest first (ties by id, so the order is total); top-k and top-p both want
        // the head of this order. With top-k only the head is sorted: a partial
        // selection, not a sort of the whole vocabulary every step.
        if let Some(k) = self.params.top_k.filter(|&k| k > 0 && k < self.candidates.len()) {
            self.candidates.select_nth_unstable_by(k - 1, by_rank);
            self.candidates.truncate(k);
        }
        self.candidates.sort_unstable_by(by_rank);
        let max = self.candidates[0].1;
        let mut total = 0.0f32;
        for c in self.candidates.iter_mut() {
            c.1 = (c.1 - max).exp();
            total += c.1;
        }
        for c in self.candidates.iter_mut() {
            c.1 /= total;
        }
        if let Some(p) = self.params.top_p.filter(|p| *p > 0.0 && *p < 1.0) {
            let mut cum = 0.0;
            let mut keep = self.candidates.len();
            for (i, c) in self.candidates.iter().enumerate() {
                cum += c.1;
                if cum >= p {
                    keep = i + 1;
                    break;
                }
            }
            self.candidates.truncate(keep);
            let total: f32 = self.candidates.iter().map(|c| c.1).sum();
            for c in self.candidates.iter_mut() {
                c.1 /= total;
            }
        }
        let mut r = self.rng.f32();
        for c in &self.candidates {
            if r < c.1 {
                return c.0;
            }
            r -= c.1;
        }
        self.candidates.last().map(|c| c.0).unwrap_or(0)
    }
}

fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_max_and_ignores_nan() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, f32::NAN, 3.0, 2.0]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: Some(1), top_p: None, seed: 1 });
        assert_eq!(s.sample(&[0.0, 5.0, 1.0]), 1);
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 0.8, top_k: Some(20), top_p: Some(0.9), seed });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_by_partial_selection_draws_as_a_full_sort_would() {
        // The reference: every candidate sorted, then cut to k (what sampling did before).
        let reference = |logits: &[f32], k: usize, t: f32, r: f32| -> u32 {
            let mut c: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l / t)).collect();
            c.sort_by(by_rank);
            c.truncate(k);
            let max = c[0].1;
            let w: Vec<f32> = c.iter().map(|x| (x.1 - max).exp()).collect();
            let total: f32 = w.iter().sum();
            let mut r = r;
            for (x, w) in c.iter().zip(&w) {
                if r < w / total {
                    return x.0;
                }
                r -= w / total;
            }
            c.last().unwrap().0
        };
        let mut rng = fastrand::Rng::with_seed(11);
        for round in 0..20 {
            // Repeated values too: ties must resolve the same way.
            let logits: Vec<f32> = (0..5000).map(|_| (rng.f32() * 40.0).round() / 4.0).collect();
            let k = 1 + round * 7;
            let seed = round as u64;
            let mut s = Sampler::new(SamplingParams { temperature: 0.9, top_k: Some(k), top_p: None, seed });
            let mut draws = fastrand::Rng::with_seed(seed);
            for _ in 0..10 {
                assert_eq!(s.sample(&logits), reference(&logits, k, 0.9, draws.f32()));
            }
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds ~97% of the mass: with top_p 0.9 only it can be drawn.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: None, top_p: Some(0.9), seed: 3 });
        for _ in 0..100 {
            assert_eq!(s.sample(&[0.0, 0.0, 5.0, 0.0, 0.0]), 2);
        }
    }
}
