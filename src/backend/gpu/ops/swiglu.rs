//! (kernel wrappers: swiglu — being written)
