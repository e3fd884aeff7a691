//! Connections to a peer over libpq (the client library, linked into mmts.so): the
//! replication connection a receiver streams from, and a plain one for signals. Only the
//! backend's main thread uses them; every call is non-blocking except `Connection::connect`,
//! which `connect_timeout` bounds.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;

#[repr(C)]
struct PGconn {
    _private: [u8; 0],
}
#[repr(C)]
struct PGresult {
    _private: [u8; 0],
}

const CONNECTION_OK: c_int = 0;
const CONNECTION_BAD: c_int = 1;
const PGRES_POLLING_FAILED: c_int = 0;
const PGRES_POLLING_READING: c_int = 1;
const PGRES_POLLING_WRITING: c_int = 2;
const PGRES_POLLING_OK: c_int = 3;
const PGRES_COMMAND_OK: c_int = 1;
const PGRES_TUPLES_OK: c_int = 2;
const PGRES_COPY_BOTH: c_int = 8;
const PGRES_PIPELINE_SYNC: c_int = 10;
const PGRES_PIPELINE_ABORTED: c_int = 11;
const PG_DIAG_SQLSTATE: c_int = b'C' as c_int;

#[link(name = "pq")]
unsafe extern "C" {
    fn PQconnectdbParams(
        keywords: *const *const c_char,
        values: *const *const c_char,
        expand_dbname: c_int,
    ) -> *mut PGconn;
    fn PQconnectStartParams(
        keywords: *const *const c_char,
        values: *const *const c_char,
        expand_dbname: c_int,
    ) -> *mut PGconn;
    fn PQconnectPoll(conn: *mut PGconn) -> c_int;
    fn PQstatus(conn: *const PGconn) -> c_int;
    fn PQerrorMessage(conn: *const PGconn) -> *const c_char;
    fn PQfinish(conn: *mut PGconn);
    fn PQexec(conn: *mut PGconn, query: *const c_char) -> *mut PGresult;
    fn PQresultStatus(res: *const PGresult) -> c_int;
    fn PQresultErrorField(res: *const PGresult, field: c_int) -> *const c_char;
    fn PQclear(res: *mut PGresult);
    fn PQgetCopyData(conn: *mut PGconn, buffer: *mut *mut c_char, async_: c_int) -> c_int;
    fn PQputCopyData(conn: *mut PGconn, buffer: *const c_char, nbytes: c_int) -> c_int;
    fn PQflush(conn: *mut PGconn) -> c_int;
    fn PQconsumeInput(conn: *mut PGconn) -> c_int;
    fn PQsocket(conn: *const PGconn) -> c_int;
    fn PQserverVersion(conn: *const PGconn) -> c_int;
    fn PQfreemem(ptr: *mut c_void);
    fn PQgetResult(conn: *mut PGconn) -> *mut PGresult;
    fn PQsendQuery(conn: *mut PGconn, query: *const c_char) -> c_int;
    fn PQsendQueryParams(
        conn: *mut PGconn,
        command: *const c_char,
        n_params: c_int,
        param_types: *const u32,
        param_values: *const *const c_char,
        param_lengths: *const c_int,
        param_formats: *const c_int,
        result_format: c_int,
    ) -> c_int;
    fn PQenterPipelineMode(conn: *mut PGconn) -> c_int;
    fn PQpipelineSync(conn: *mut PGconn) -> c_int;
    fn PQisBusy(conn: *mut PGconn) -> c_int;
    fn PQntuples(res: *const PGresult) -> c_int;
    fn PQgetvalue(res: *const PGresult, row: c_int, column: c_int) -> *const c_char;
}

/// An error from the peer or the connection: message and SQLSTATE if the server sent one.
#[derive(Debug, Clone)]
pub struct PqError {
    pub message: String,
    pub sqlstate: Option<String>,
}

impl std::fmt::Display for PqError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message.trim_end())
    }
}

pub struct Connection {
    /// Valid from `open` until `drop` finishes it: the libpq calls below all get a live
    /// connection. (`NonNull` also keeps `Connection` on the thread that made it.)
    conn: NonNull<PGconn>,
    /// First column of the first row of the last result that had rows.
    value: Option<String>,
    /// While connecting without waiting: what libpq last asked to wait for.
    polling: c_int,
    /// In libpq's pipeline mode (see [`Connection::send_pipelined`]).
    pipelined: bool,
}

/// What one non-blocking read of the copy stream gave.
pub enum CopyData {
    Message(Vec<u8>),
    /// Nothing buffered: wait for the socket.
    WouldBlock,
}

impl Connection {
    /// Opens a logical replication connection (`replication=database`) to `conninfo`.
    pub fn connect_replication(conninfo: &str, application_name: &str) -> Result<Connection, PqError> {
        Connection::connect(conninfo, application_name, true)
    }

    /// Opens a connection to `conninfo`, a replication one (`replication=database`) or not.
    pub fn connect(conninfo: &str, application_name: &str, replication: bool) -> Result<Connection, PqError> {
        let connection = Connection::open(conninfo, application_name, replication, PQconnectdbParams)?;
        // SAFETY: `connection.conn` is the live PGconn just opened.
        if unsafe { PQstatus(connection.conn.as_ptr()) } != CONNECTION_OK {
            return Err(connection.error(None));
        }
        Ok(connection)
    }

    /// Starts opening a plain connection to `conninfo` without waiting: drive it with
    /// [`Connection::poll_connect`].
    pub fn start(conninfo: &str, application_name: &str) -> Result<Connection, PqError> {
        let connection = Connection::open(conninfo, application_name, false, PQconnectStartParams)?;
        // SAFETY: `connection.conn` is the live PGconn just opened.
        if unsafe { PQstatus(connection.conn.as_ptr()) } == CONNECTION_BAD {
            return Err(connection.error(None));
        }
        Ok(connection)
    }

    /// After [`Connection::start`]: `Ok(true)` once connected, `Ok(false)` while under way
    /// (call again later; libpq is only asked to go on once the socket is ready). The caller
    /// bounds how long it waits.
    pub fn poll_connect(&mut self) -> Result<bool, PqError> {
        // SAFETY: `self.conn` is a live PGconn (see the field).
        if unsafe { PQstatus(self.conn.as_ptr()) } == CONNECTION_OK {
            return Ok(true);
        }
        let wanted = match self.polling {
            PGRES_POLLING_READING => pgrx::pg_sys::WL_SOCKET_READABLE,
            _ => pgrx::pg_sys::WL_SOCKET_WRITEABLE,
        };
        // SAFETY: a zero-timeout wait on this connection's socket, no latch.
        let ready = unsafe {
            pgrx::pg_sys::WaitLatchOrSocket(
                std::ptr::null_mut(),
                (wanted | pgrx::pg_sys::WL_TIMEOUT | pgrx::pg_sys::WL_EXIT_ON_PM_DEATH) as c_int,
                self.socket(),
                0,
                pgrx::pg_sys::PG_WAIT_EXTENSION,
            )
        } as u32
            & wanted
            != 0;
        if !ready {
            return Ok(false);
        }
        // SAFETY: `self.conn` is a live PGconn (see the field).
        self.polling = unsafe { PQconnectPoll(self.conn.as_ptr()) };
        match self.polling {
            PGRES_POLLING_OK => Ok(true),
            PGRES_POLLING_FAILED => Err(self.error(None)),
            _ => Ok(false),
        }
    }

    /// Opens a connection with `open` (libpq's blocking or non-blocking connect).
    fn open(
        conninfo: &str,
        application_name: &str,
        replication: bool,
        open: unsafe extern "C" fn(*const *const c_char, *const *const c_char, c_int) -> *mut PGconn,
    ) -> Result<Connection, PqError> {
        // Values travel as text: make their output unambiguous whatever the peer's settings.
        let keys = [c"connect_timeout", c"dbname", c"application_name", c"options", c"replication"];
        let conninfo =
            CString::new(conninfo).map_err(|_| PqError { message: "NUL in conninfo".into(), sqlstate: None })?;
        let app = crate::backend::cstring(application_name);
        // Later keywords win, and `dbname` is expanded as a whole connection string, so the
        // user's own connect_timeout (inside it) overrides the default.
        let options = c"-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3";
        let values = [c"2".as_ptr(), conninfo.as_ptr(), app.as_ptr(), options.as_ptr(), c"database".as_ptr()];
        let n = if replication { keys.len() } else { keys.len() - 1 };
        let mut keywords: Vec<*const c_char> = keys[..n].iter().map(|k| k.as_ptr()).collect();
        let mut values: Vec<*const c_char> = values[..n].to_vec();
        keywords.push(std::ptr::null());
        values.push(std::ptr::null());
        // SAFETY: both arrays are NULL-terminated and their strings outlive the call.
        let raw = unsafe { open(keywords.as_ptr(), values.as_ptr(), 1) };
        let conn = NonNull::new(raw).ok_or_else(|| PqError { message: "out of memory".into(), sqlstate: None })?;
        Ok(Connection { conn, value: None, polling: PGRES_POLLING_WRITING, pipelined: false })
    }

    /// Sends `command` without waiting for its result (see [`Connection::poll_result`]).
    pub fn send(&mut self, command: &str) -> Result<(), PqError> {
        let command = CString::new(command).expect("no NUL in commands");
        // SAFETY: `self.conn` is a live PGconn (see the field); `command` outlives the call.
        let ok = unsafe { PQsendQuery(self.conn.as_ptr(), command.as_ptr()) } == 1
            && unsafe { PQflush(self.conn.as_ptr()) } >= 0;
        if ok {
            Ok(())
        } else {
            Err(self.error(None))
        }
    }

    /// After [`Connection::send`]: `Ok(true)` once the command's result is in (and it
    /// succeeded), `Ok(false)` while it has not come.
    pub fn poll_result(&mut self) -> Result<bool, PqError> {
        self.consume_input()?;
        // SAFETY: `self.conn` is a live PGconn (see the field).
        if unsafe { PQisBusy(self.conn.as_ptr()) } == 1 {
            return Ok(false);
        }
        let mut outcome = Ok(true);
        loop {
            // SAFETY: `res` is checked for NULL, then read and cleared once, at the end of the turn.
            let res = unsafe { PQgetResult(self.conn.as_ptr()) };
            if res.is_null() {
                return outcome;
            }
            // SAFETY: `res` from PQgetResult: non-null (checked) and owned here until PQclear.
            match unsafe { PQresultStatus(res) } {
                PGRES_COMMAND_OK => {}
                PGRES_TUPLES_OK if unsafe { PQntuples(res) } > 0 => {
                    // SAFETY: row 0, column 0 exists; libpq returns a NUL-terminated value ("" for
                    // NULL) that lives until PQclear below, and it is copied before.
                    self.value = Some(unsafe { CStr::from_ptr(PQgetvalue(res, 0, 0)) }.to_string_lossy().into_owned());
                }
                PGRES_TUPLES_OK => {}
                _ => outcome = Err(self.error(Some(res))),
            }
            // SAFETY: `res` is non-null and cleared once, after its last use.
            unsafe { PQclear(res) };
        }
    }

    /// Sends `command` (one statement) in libpq's pipeline mode, ending it with a sync of its
    /// own, without waiting for the results of those sent before: commands sent this way run
    /// one after another on the server, in order, each in its own transaction, and a failed
    /// one fails no other. [`Connection::poll_pipeline`] collects their results. A connection
    /// that uses this uses nothing else.
    pub fn send_pipelined(&mut self, command: &str) -> Result<(), PqError> {
        let command = CString::new(command).expect("no NUL in commands");
        // SAFETY: `self.conn` is a live PGconn (see the field), with no command under way the
        // first time (pipeline mode is entered then); `command` outlives the call; no
        // parameters are passed (all their arrays NULL, as libpq allows for none).
        let ok = unsafe {
            (self.pipelined || PQenterPipelineMode(self.conn.as_ptr()) == 1)
                && PQsendQueryParams(
                    self.conn.as_ptr(),
                    command.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                    std::ptr::null(),
                    0,
                ) == 1
                && PQpipelineSync(self.conn.as_ptr()) == 1
                && PQflush(self.conn.as_ptr()) >= 0
        };
        self.pipelined = true;
        if ok {
            Ok(())
        } else {
            Err(self.error(None))
        }
    }

    /// After [`Connection::send_pipelined`]: how many of the commands sent (at most
    /// `outstanding`, the oldest first) have ended since the last call, and the error of the
    /// first of them that failed, or of the connection.
    pub fn poll_pipeline(&mut self, outstanding: usize) -> (usize, Option<PqError>) {
        if outstanding == 0 {
            return (0, None);
        }
        if let Err(e) = self.consume_input() {
            return (0, Some(e));
        }
        let mut ended = 0;
        let mut failed = None;
        // Each command gives its results, a NULL, then its sync. Bounded, should libpq keep
        // answering NULL with nothing pending.
        for _ in 0..64 * outstanding {
            // SAFETY: `self.conn` is a live PGconn (see the field).
            if ended == outstanding || unsafe { PQisBusy(self.conn.as_ptr()) } == 1 {
                break;
            }
            // SAFETY: as above; `res` is checked for NULL, then read and cleared once.
            let res = unsafe { PQgetResult(self.conn.as_ptr()) };
            if res.is_null() {
                continue;
            }
            // SAFETY: `res` from PQgetResult: non-null (checked) and owned here until PQclear.
            match unsafe { PQresultStatus(res) } {
                PGRES_PIPELINE_SYNC => ended += 1,
                PGRES_COMMAND_OK | PGRES_TUPLES_OK | PGRES_PIPELINE_ABORTED => {}
                _ => {
                    if failed.is_none() {
                        failed = Some(self.error(Some(res)));
                    }
                }
            }
            // SAFETY: `res` is non-null and cleared once, after its last use.
            unsafe { PQclear(res) };
        }
        (ended, failed)
    }

    /// Runs `command` and returns the first value of its result, waiting at most `timeout`.
    pub fn query_value(&mut self, command: &str, timeout: std::time::Duration) -> Result<Option<String>, PqError> {
        let deadline = std::time::Instant::now() + timeout;
        self.value = None;
        self.send(command)?;
        while !self.poll_result()? {
            if std::time::Instant::now() >= deadline {
                return Err(PqError {
                    message: format!("no answer within {} ms", timeout.as_millis()),
                    sqlstate: None,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(self.value.take())
    }

    fn error(&self, res: Option<*mut PGresult>) -> PqError {
        // SAFETY: PQerrorMessage never returns NULL and its text lives until the next call on
        // the connection; it is copied at once. `r` is a result not yet cleared, or NULL, which
        // PQresultErrorField accepts (returning NULL, checked).
        let message = unsafe { CStr::from_ptr(PQerrorMessage(self.conn.as_ptr())) }.to_string_lossy().into_owned();
        let sqlstate = res.and_then(|r| {
            let field = unsafe { PQresultErrorField(r, PG_DIAG_SQLSTATE) };
            (!field.is_null()).then(|| unsafe { CStr::from_ptr(field) }.to_string_lossy().into_owned())
        });
        PqError { message, sqlstate }
    }

    /// Runs a command; `Ok` for command, tuples and copy-both results.
    pub fn exec(&mut self, command: &str) -> Result<(), PqError> {
        let command = CString::new(command).expect("no NUL in commands");
        // SAFETY: `command` outlives the call; `res` may be NULL, which PQresultStatus and PQclear
        // accept; it is cleared once, after its last use.
        let res = unsafe { PQexec(self.conn.as_ptr(), command.as_ptr()) };
        let status = unsafe { PQresultStatus(res) };
        let result = match status {
            PGRES_COMMAND_OK | PGRES_TUPLES_OK | PGRES_COPY_BOTH => Ok(()),
            _ => Err(self.error(Some(res))),
        };
        // SAFETY: `res` from PQexec (NULL is accepted), cleared once, after its last use.
        unsafe { PQclear(res) };
        result
    }

    /// Reads the next copy-stream message without blocking.
    pub fn get_copy_data(&mut self) -> Result<CopyData, PqError> {
        let mut buf: *mut c_char = std::ptr::null_mut();
        // SAFETY: `self.conn` is a live PGconn (see the field); `buf` is a local out-parameter.
        let n = unsafe { PQgetCopyData(self.conn.as_ptr(), &mut buf, 1) };
        match n {
            0 => Ok(CopyData::WouldBlock),
            n if n > 0 => {
                // SAFETY: libpq allocated `n` bytes at `buf` for this message; they are copied, then
                // freed with PQfreemem, once.
                let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), n as usize) }.to_vec();
                unsafe { PQfreemem(buf.cast()) };
                Ok(CopyData::Message(data))
            }
            -1 => {
                // The stream ended: the server's reason is in the final result.
                // SAFETY: `res` (possibly NULL, which both accept) is read, then cleared once.
                let res = unsafe { PQgetResult(self.conn.as_ptr()) };
                let err = self.error(Some(res));
                unsafe { PQclear(res) };
                Err(PqError { message: format!("replication stream ended: {}", err.message), sqlstate: err.sqlstate })
            }
            _ => Err(self.error(None)),
        }
    }

    pub fn put_copy_data(&mut self, data: &[u8]) -> Result<(), PqError> {
        // SAFETY: libpq copies the `data.len()` bytes of the borrowed slice into its buffer.
        let ok = unsafe { PQputCopyData(self.conn.as_ptr(), data.as_ptr().cast(), data.len() as c_int) } == 1
            && unsafe { PQflush(self.conn.as_ptr()) } >= 0;
        if ok {
            Ok(())
        } else {
            Err(self.error(None))
        }
    }

    /// Reads what arrived on the socket into libpq's buffer.
    pub fn consume_input(&mut self) -> Result<(), PqError> {
        // SAFETY: `self.conn` is a live PGconn (see the field).
        if unsafe { PQconsumeInput(self.conn.as_ptr()) } == 1 {
            Ok(())
        } else {
            Err(self.error(None))
        }
    }

    pub fn socket(&self) -> c_int {
        // SAFETY: `self.conn` is a live PGconn (see the field).
        unsafe { PQsocket(self.conn.as_ptr()) }
    }

    /// The server's version as a number (`180006` for 18.6).
    pub fn server_version(&self) -> i32 {
        // SAFETY: `self.conn` is a live PGconn (see the field).
        unsafe { PQserverVersion(self.conn.as_ptr()) }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the connection is finished once, here; nothing uses it afterwards.
        unsafe { PQfinish(self.conn.as_ptr()) };
    }
}
