//! Internal logging through `defmt` or `log`, whichever feature is on.

/// Debug-level message; compiled out when neither `defmt` nor `log` is enabled.
macro_rules! log_debug {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        defmt::debug!($($arg)*);
        #[cfg(all(feature = "log", not(feature = "defmt")))]
        log::debug!($($arg)*);
        #[cfg(not(any(feature = "log", feature = "defmt")))]
        {
            let _ = || ($($arg)*,);
        }
    }};
}

/// Warning-level message; compiled out when neither `defmt` nor `log` is enabled.
#[allow(unused_macros)]
macro_rules! log_warn {
    ($($arg:tt)*) => {{
        #[cfg(feature = "defmt")]
        defmt::warn!($($arg)*);
        #[cfg(all(feature = "log", not(feature = "defmt")))]
        log::warn!($($arg)*);
        #[cfg(not(any(feature = "log", feature = "defmt")))]
        {
            let _ = || ($($arg)*,);
        }
    }};
}

#[allow(unused_imports)]
pub(crate) use {log_debug, log_warn};
