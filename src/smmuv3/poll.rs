//! Bounded waits on the SMMU: every wait gives up with a timeout error.

use super::error::SmmuError;

/// Calls `done` until it returns true, at most `budget` times; `what` names
/// the wait in the [`SmmuError::Timeout`] returned when the budget runs out.
///
/// # Errors
///
/// [`SmmuError::Timeout`] naming `what` when `done` never returned true within `budget` calls.
pub fn poll_until(
    what: &'static str,
    budget: u32,
    mut done: impl FnMut() -> bool,
) -> Result<(), SmmuError> {
    for _ in 0..budget.max(1) {
        if done() {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err(SmmuError::Timeout {
        what,
        polls: budget.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_never_holds_times_out_after_the_budget() {
        let mut calls = 0;
        let r = poll_until("never", 5, || {
            calls += 1;
            false
        });
        assert_eq!(
            r,
            Err(SmmuError::Timeout {
                what: "never",
                polls: 5
            })
        );
        assert_eq!(calls, 5);
        let mut n = 0;
        assert_eq!(
            poll_until("third time", 5, || {
                n += 1;
                n == 3
            }),
            Ok(())
        );
    }
}
