//! weir gateway runtime.
