//! (kernel wrappers: optim — being written)
