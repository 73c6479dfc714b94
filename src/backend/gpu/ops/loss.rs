//! (kernel wrappers: loss — being written)
