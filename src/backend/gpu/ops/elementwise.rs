//! (kernel wrappers: elementwise — being written)
