//! Declarations shared with the C layer (src/interp/c/glue.h).  The layouts
//! here must match the C structs exactly; they are plain data and carry no
//! ownership.

use std::os::raw::{c_char, c_int};

/// A borrowed byte string crossing the C boundary.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PagiStr {
    pub ptr: *const c_char,
    pub len: usize,
}

impl PagiStr {
    pub const NULL: PagiStr = PagiStr {
        ptr: std::ptr::null(),
        len: 0,
    };

    pub fn from_bytes(b: &[u8]) -> PagiStr {
        PagiStr {
            ptr: b.as_ptr().cast(),
            len: b.len(),
        }
    }

    /// # Safety
    /// `ptr` must point at `len` readable bytes for the returned lifetime (or be null).
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            &[]
        } else {
            // SAFETY: the caller guarantees ptr/len describe live memory.
            unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
        }
    }
}

/// One message for the interpreter, laid out for `_next` (src/interp/c/request.c).
#[repr(C)]
pub struct PagiMsg {
    pub kind: c_int,
    pub id: u64,
    pub num: [i64; 4],
    pub str: [PagiStr; 12],
    pub nstr: usize,
    pub utf8_mask: u32,
    pub headers: *const PagiStr,
    pub nheaders: usize,
    pub has_headers: c_int,
    /// A request's `tls` extension; null on a cleartext connection.
    pub tls: *const PagiTls,
    /// A BODY message's body: `npieces` strings, to be joined in order.
    pub pieces: *const PagiStr,
    pub npieces: usize,
    /// A BODY message's body is one buffer Perl may own:
    /// `pagi_rs_adopt_body` gives it.
    pub adoptable: c_int,
}

/// The `tls` extension of a request's scope (PAGI::Spec::Tls), laid out for
/// glue.c's `tls_hv`.  A string with a null `ptr` and a number below 0 are
/// undef.
#[repr(C)]
pub struct PagiTls {
    pub server_cert: PagiStr,
    /// `nclient_cert_chain` PEM strings, leaf first.
    pub client_cert_chain: *const PagiStr,
    pub nclient_cert_chain: usize,
    pub client_cert_name: PagiStr,
    pub tls_version: i32,
    pub cipher_suite: i32,
}

impl PagiTls {
    pub const NONE: PagiTls = PagiTls {
        server_cert: PagiStr::NULL,
        client_cert_chain: std::ptr::null(),
        nclient_cert_chain: 0,
        client_cert_name: PagiStr::NULL,
        tls_version: -1,
        cipher_suite: -1,
    };
}

/// Opaque `PerlInterpreter`.
#[repr(C)]
pub struct PerlInterpreter {
    _private: [u8; 0],
}

extern "C" {
    pub fn pagi_sys_init();
    pub fn pagi_method_cache_setup(enable: c_int);
    pub fn pagi_interp_new(argc: c_int, argv: *mut *mut c_char) -> *mut PerlInterpreter;
    pub fn pagi_interp_free(interp: *mut PerlInterpreter);
    pub fn pagi_install_exit_guard();
    pub fn pagi_install_signal_forwarding();
    pub fn pagi_add_signal_target(interp: *mut PerlInterpreter, wake_fd: c_int);
    pub fn pagi_close_in_forked_children(fd: c_int) -> c_int;
    pub fn pagi_mark_server_process();
    pub fn pagi_interp_adopt(interp: *mut PerlInterpreter, forked: c_int);
    pub fn pagi_interp_flush_before_fork(interp: *mut PerlInterpreter);
    pub fn pagi_interp_set_context(interp: *mut PerlInterpreter);
    pub fn pagi_set_server_signals(fd: c_int, mask: u64);
    pub fn pagi_is_perl_signal_handler(handler: *mut std::ffi::c_void) -> c_int;
    #[cfg(test)]
    pub fn pagi_signal_target_for(sig: c_int) -> c_int;
    #[cfg(test)]
    pub fn pagi_take_signal_here(sig: c_int);
    #[cfg(test)]
    pub fn pagi_current_context() -> *mut PerlInterpreter;
    pub fn pagi_call(
        interp: *mut PerlInterpreter,
        name: *const c_char,
        args: *const PagiStr,
        nargs: usize,
        result: *mut PagiStr,
    ) -> c_int;
    pub fn pagi_eval(
        interp: *mut PerlInterpreter,
        code: *const c_char,
        result: *mut PagiStr,
    ) -> c_int;
}
