//! (kernel wrappers: embedding — being written)
