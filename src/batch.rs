//! Rolling batches with Ansible `serial` semantics, and the failure budget.
//!
//! Pure functions, checked against Ansible's own `_get_serialized_batches` and `pct_to_int`:
//! a share is `int(pct / 100.0 × all hosts)` in floating point, as Python computes it, but at least 1, always of *all* hosts (not of those left);
//! in a list each entry is used once and the last one repeats. Unlike Ansible, 0 and shares above
//! 100 % are refused when the config loads (see `config::BatchSpec`) instead of meaning "all".

use crate::config::{BatchSize, BatchSpec, Percent, Strategy};

/// Sizes of the batches that move `hosts` hosts, in order.
pub fn batch_sizes(spec: &BatchSpec, hosts: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut left = hosts;
    let mut entry = 0;
    while left > 0 {
        let size = match spec.0.get(entry).or(spec.0.last()) {
            Some(BatchSize::Count(n)) => *n as usize,
            // In floating point, as Ansible's `int((pct / 100.0) * n)`: "29%" of 100 hosts
            // is 28 there (0.29 * 100 = 28.999...), and so it is here.
            Some(BatchSize::Percent(p)) => ((f64::from(*p) / 100.0 * hosts as f64) as usize).max(1),
            None => hosts,
        }
        .max(1);
        let take = size.min(left);
        sizes.push(take);
        left -= take;
        entry = (entry + 1).min(spec.0.len().saturating_sub(1));
    }
    sizes
}

/// Splits `items` into batches of [`batch_sizes`].
pub fn batches<T: Clone>(spec: &BatchSpec, items: &[T]) -> Vec<Vec<T>> {
    let mut rest = items;
    batch_sizes(spec, items.len())
        .into_iter()
        .map(|n| {
            let (now, later) = rest.split_at(n);
            rest = later;
            now.to_vec()
        })
        .collect()
}

/// Ansible's `max_fail_percentage`: a batch fails when the share of failed hosts is *strictly
/// greater* than the budget; with 0 any failure fails it.
pub fn batch_failed(failed: usize, batch_size: usize, max_fail: Percent) -> bool {
    if failed == 0 || batch_size == 0 {
        return false;
    }
    // Ansible's own comparison, `failed / batch_size > max_fail_percentage / 100.0`: scaling
    // the share up by 100 instead rounds 11/20 to 55.000000000000007, over a budget of 55.
    failed as f64 / batch_size as f64 > max_fail.0 / 100.0
}

/// Why failures exhaust the strategy's budget, if they do: every host of the batch (`label`),
/// more than `max_fail_percentage` of it, or more than `max_failed_hosts` across the
/// deployment (`failed_in_all`).
/// Shared by rolling batches and a canary's promotion.
pub fn over_budget(
    strategy: &Strategy,
    label: &str,
    batch_failures: usize,
    batch_size: usize,
    failed_in_all: usize,
) -> Option<String> {
    if batch_failed(batch_failures, batch_size, strategy.max_fail_percentage) {
        return Some(format!(
            "{label}: {batch_failures} of {batch_size} host(s) failed, more than max_fail_percentage = {}%",
            strategy.max_fail_percentage.0
        ));
    }
    if batch_size > 0 && batch_failures == batch_size {
        // Ansible ends the play when a whole batch fails, whatever max_fail_percentage says;
        // going on would only fail the next batch the same way.
        return Some(format!(
            "{label}: all {batch_size} host(s) of the batch failed (a whole batch failing stops the deploy, whatever max_fail_percentage says)"
        ));
    }
    strategy
        .max_failed_hosts
        .filter(|m| failed_in_all as u32 > *m)
        .map(|m| format!("{failed_in_all} host(s) failed in all, more than max_failed_hosts = {m}"))
}

/// The first batch that `failed` hosts alone would stop: the reason [`over_budget`] gives
/// for it, if any. Hosts that cannot take part at all (a release that did not stage, a host
/// that could not be reached) fail in their batch whatever happens before it, so a deploy
/// they would stop is stopped before it moves the batches ahead of theirs, only to undo them.
pub fn first_batch_over_budget(
    strategy: &Strategy,
    plan: &[Vec<&str>],
    failed: &dyn Fn(&str) -> bool,
) -> Option<String> {
    let mut failed_in_all = 0;
    for (i, hosts) in plan.iter().enumerate() {
        let batch_failures = hosts.iter().filter(|h| failed(h)).count();
        failed_in_all += batch_failures;
        let label = format!("batch {}/{}", i + 1, plan.len());
        let over = over_budget(strategy, &label, batch_failures, hosts.len(), failed_in_all);
        if over.is_some() {
            return over;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(entries: &[BatchSize]) -> BatchSpec {
        BatchSpec(entries.to_vec())
    }
    use BatchSize::{Count, Percent as Pct};

    #[test]
    fn thirty_percent_of_twenty() {
        assert_eq!(batch_sizes(&spec(&[Pct(30)]), 20), vec![6, 6, 6, 2]);
    }

    #[test]
    fn list_uses_each_entry_once_and_repeats_the_last() {
        assert_eq!(
            batch_sizes(&spec(&[Count(1), Count(5), Pct(20)]), 20),
            vec![1, 5, 4, 4, 4, 2]
        );
    }

    #[test]
    fn shares_round_as_ansible_does_in_floating_point() {
        // Python: int(29 / 100.0 * 100) == 28, int(57 / 100.0 * 200) == 113.
        assert_eq!(batch_sizes(&spec(&[Pct(29)]), 100)[0], 28);
        assert_eq!(batch_sizes(&spec(&[Pct(57)]), 200)[0], 113);
        assert_eq!(batch_sizes(&spec(&[Pct(25)]), 4), vec![1, 1, 1, 1]);
    }

    #[test]
    fn small_share_is_at_least_one_host() {
        assert_eq!(batch_sizes(&spec(&[Pct(10)]), 3), vec![1, 1, 1]);
    }

    #[test]
    fn counts_and_edges() {
        assert_eq!(batch_sizes(&spec(&[Count(1)]), 4), vec![1, 1, 1, 1]);
        assert_eq!(batch_sizes(&spec(&[Count(10)]), 4), vec![4]);
        assert_eq!(batch_sizes(&spec(&[Count(1), Pct(50)]), 4), vec![1, 2, 1]);
        assert_eq!(batch_sizes(&spec(&[Pct(100)]), 7), vec![7]);
        assert!(batch_sizes(&spec(&[Count(3)]), 0).is_empty());
    }

    #[test]
    fn batches_keep_order() {
        let hosts = ["a", "b", "c", "d", "e"];
        assert_eq!(
            batches(&spec(&[Count(1), Count(2)]), &hosts),
            vec![vec!["a"], vec!["b", "c"], vec!["d", "e"]]
        );
    }

    #[test]
    fn failure_budget_is_strictly_greater_than() {
        let p49 = Percent(49.0);
        assert!(!batch_failed(1, 4, p49), "25% <= 49% passes");
        assert!(batch_failed(2, 4, p49), "50% > 49% fails");
        assert!(!batch_failed(2, 4, Percent(50.0)), "50% is not > 50%");
        assert!(batch_failed(1, 100, Percent(0.0)), "0: any failure fails");
        assert!(!batch_failed(0, 4, Percent(0.0)));
        assert!(batch_failed(4, 4, Percent(99.0)));
        assert!(!batch_failed(4, 4, Percent(100.0)));
        // Exactly at the budget is not over it, where scaling by 100 first rounded up.
        for (failed, size, pct) in [(11, 20, 55.0), (7, 100, 7.0), (7, 25, 28.0), (7, 50, 14.0)] {
            assert!(
                !batch_failed(failed, size, Percent(pct)),
                "{failed}/{size} is exactly {pct}%"
            );
            assert!(batch_failed(failed + 1, size, Percent(pct)));
        }
    }

    #[test]
    fn the_budget_names_what_it_ran_out_of() {
        let strategy = Strategy {
            max_fail_percentage: Percent(25.0),
            max_failed_hosts: Some(2),
            ..Strategy::default()
        };
        assert_eq!(over_budget(&strategy, "batch 1/2", 1, 4, 1), None);
        assert_eq!(
            over_budget(&strategy, "batch 1/2", 2, 4, 2).as_deref(),
            Some("batch 1/2: 2 of 4 host(s) failed, more than max_fail_percentage = 25%")
        );
        assert_eq!(
            over_budget(&strategy, "batch 2/2", 1, 4, 3).as_deref(),
            Some("3 host(s) failed in all, more than max_failed_hosts = 2")
        );
    }

    #[test]
    fn a_whole_batch_failing_stops_whatever_the_percentage() {
        let strategy = Strategy {
            max_fail_percentage: Percent(100.0),
            ..Strategy::default()
        };
        assert_eq!(over_budget(&strategy, "batch 1/4", 0, 1, 0), None);
        assert_eq!(over_budget(&strategy, "batch 1/2", 3, 4, 3), None);
        assert_eq!(
            over_budget(&strategy, "batch 1/4", 1, 1, 1).as_deref(),
            Some(
                "batch 1/4: all 1 host(s) of the batch failed (a whole batch failing stops the deploy, whatever max_fail_percentage says)"
            )
        );
    }

    #[test]
    fn the_first_batch_that_known_failures_would_stop_is_named() {
        let strategy = Strategy {
            max_fail_percentage: Percent(30.0),
            max_failed_hosts: Some(2),
            ..Strategy::default()
        };
        let plan = vec![
            vec!["a"],
            vec!["b", "c", "d", "e"],
            vec!["f", "g", "h", "i"],
        ];
        let down = |names: &'static [&'static str]| move |h: &str| names.contains(&h);
        assert_eq!(first_batch_over_budget(&strategy, &plan, &down(&[])), None);
        // One of four in a batch is within 30%.
        assert_eq!(
            first_batch_over_budget(&strategy, &plan, &down(&["c", "f"])),
            None
        );
        assert_eq!(
            first_batch_over_budget(&strategy, &plan, &down(&["a"])).as_deref(),
            Some("batch 1/3: 1 of 1 host(s) failed, more than max_fail_percentage = 30%")
        );
        assert_eq!(
            first_batch_over_budget(&strategy, &plan, &down(&["f", "g"])).as_deref(),
            Some("batch 3/3: 2 of 4 host(s) failed, more than max_fail_percentage = 30%")
        );
        // Counted across batches too.
        assert_eq!(
            first_batch_over_budget(&strategy, &plan, &down(&["b", "f", "i"])).as_deref(),
            Some("batch 3/3: 2 of 4 host(s) failed, more than max_fail_percentage = 30%")
        );
        let strategy = Strategy {
            max_fail_percentage: Percent(50.0),
            max_failed_hosts: Some(1),
            ..Strategy::default()
        };
        assert_eq!(
            first_batch_over_budget(&strategy, &plan, &down(&["b", "f"])).as_deref(),
            Some("2 host(s) failed in all, more than max_failed_hosts = 1")
        );
    }
}
