//! Every raw pointer the C ABI receives is read or written here, and only here.

use std::ffi::{CStr, c_char};

/// A C string argument: `None` for NULL, an error naming `what` when it is not UTF-8.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<Option<&'a str>, String> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller guarantees a NUL-terminated string valid for 'a (documented per
    // function in the header).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(Some).map_err(|_| format!("{what} is not UTF-8"))
}

/// A shared reference to what `p` points to, or `None` for NULL.
///
/// # Safety
/// `p` is NULL or points to a live, properly aligned `T` that nobody mutates for `'a`.
pub unsafe fn borrow<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: the caller guarantees `p` is NULL or valid and aligned for 'a.
    unsafe { p.as_ref() }
}

/// Writes `v` where `p` points, if `p` is not NULL; returns whether it did.
///
/// # Safety
/// `p` is NULL or points to writable, properly aligned memory for a `T`.
pub unsafe fn write_out<T>(p: *mut T, v: T) -> bool {
    if p.is_null() {
        return false;
    }
    // SAFETY: the caller guarantees `p` is writable and aligned for a T; `write` does not drop
    // the uninitialised old value.
    unsafe { p.write(v) };
    true
}

/// Takes back a box handed out by `Box::into_raw`.
///
/// # Safety
/// `p` is NULL or came from `Box::into_raw` of a `Box<T>` and was not taken back before.
pub unsafe fn take<T>(p: *mut T) -> Option<Box<T>> {
    // SAFETY: the caller guarantees `p` came from Box::into_raw and is not used again.
    (!p.is_null()).then(|| unsafe { Box::from_raw(p) })
}

/// The first bytes of the `size` bytes at `p` that a struct of `ours` bytes knows, copied into a
/// zeroed `T` (a caller built against an older, shorter struct leaves the new fields zero).
///
/// # Safety
/// `p` points to at least `size` readable bytes; `T` is valid when all zero (a `repr(C)` struct
/// of integers and pointers).
pub unsafe fn versioned<T: Copy>(p: *const T, size: usize) -> T {
    let n = size.min(std::mem::size_of::<T>());
    // SAFETY: all-zero is a valid T (caller's guarantee), and we copy at most n bytes that the
    // caller guarantees readable into the zeroed value's own storage.
    unsafe {
        let mut v: T = std::mem::zeroed();
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), std::ptr::from_mut(&mut v).cast::<u8>(), n);
        v
    }
}
