//! TODO(helper): rmsprop
