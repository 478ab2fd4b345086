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
        #[cfg(test)]
        test_hook::call();
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

/// Host tests' fake hardware can run on the driver's own thread: the hook
/// is called once per poll, so the fake answers (or refuses to) at each
/// register read the driver waits on, deterministically and without a
/// second thread that a loaded machine may not schedule.
#[cfg(test)]
pub(crate) mod test_hook {
    extern crate std;
    use core::cell::RefCell;
    use std::boxed::Box;

    std::thread_local! {
        static HOOK: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    }

    /// Installs (or removes) this thread's hook.
    pub(crate) fn set(hook: Option<Box<dyn FnMut()>>) {
        HOOK.with(|h| *h.borrow_mut() = hook);
    }

    pub(super) fn call() {
        HOOK.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f()
            }
        });
    }
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
