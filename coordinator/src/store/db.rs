//! The two databases the store runs on, SQLite embedded and PostgreSQL
//! shared by replicas, behind one small interface: each statement is
//! written once, in the SQL both accept (`?N` parameters, `ON CONFLICT`,
//! `CASE` for a larger-of-two), with arguments and columns of a handful of
//! plain types. Where the two truly differ (DDL, a row's insertion order)
//! the caller picks by [`Tx::dialect`] where the statement is written.

use std::{collections::HashMap, error::Error as StdError, fmt};

use postgres::types::{to_sql_checked, IsNull, ToSql, Type};

/// Which SQL a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Why a statement failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", pg_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("column {index}: {why}")]
    Column { index: usize, why: String },
    /// An earlier error, as text: what the jobs of a failed batch are told.
    #[error("{0}")]
    Failed(String),
}

impl DbError {
    /// The same error for another waiter (the driver errors do not clone).
    pub fn copy(&self) -> Self {
        DbError::Failed(self.to_string())
    }

    /// SQLite's code for the error, if it is SQLite's.
    pub fn sqlite_code(&self) -> Option<rusqlite::ErrorCode> {
        match self {
            DbError::Sqlite(e) => e.sqlite_error_code(),
            _ => None,
        }
    }
}

/// PostgreSQL's own words for a server error (the driver's Display says
/// only "db error"), else the driver's.
fn pg_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
        None => match e.source() {
            Some(src) => format!("{e}: {src}"),
            None => e.to_string(),
        },
    }
}

/// One statement argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

/// What can be passed as an [`Arg`] (see [`args!`]).
pub trait ToArg {
    fn arg(&self) -> Arg<'_>;
}

impl ToArg for i64 {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(*self)
    }
}
impl ToArg for u32 {
    fn arg(&self) -> Arg<'_> {
        Arg::Int(i64::from(*self))
    }
}
impl ToArg for str {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(self)
    }
}
impl ToArg for String {
    fn arg(&self) -> Arg<'_> {
        Arg::Text(self)
    }
}
impl ToArg for [u8] {
    fn arg(&self) -> Arg<'_> {
        Arg::Blob(self)
    }
}
impl ToArg for Vec<u8> {
    fn arg(&self) -> Arg<'_> {
        Arg::Blob(self)
    }
}
impl<T: ToArg> ToArg for Option<T> {
    fn arg(&self) -> Arg<'_> {
        self.as_ref().map_or(Arg::Null, ToArg::arg)
    }
}
impl<T: ToArg + ?Sized> ToArg for &T {
    fn arg(&self) -> Arg<'_> {
        (**self).arg()
    }
}

/// A statement's arguments: `args![a, b]` is `&[Arg]` borrowing each.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &[$($crate::store::db::ToArg::arg(&$a)),*] as &[$crate::store::db::Arg<'_>]
    };
}
pub(crate) use args;

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Null => ValueRef::Null,
            Arg::Int(v) => ValueRef::Integer(v),
            Arg::Text(s) => ValueRef::Text(s.as_bytes()),
            Arg::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl ToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        fn checked<T: ToSql>(
            v: T,
            ty: &Type,
            out: &mut bytes::BytesMut,
        ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
            v.to_sql_checked(ty, out)
        }
        match *self {
            Arg::Null => Ok(IsNull::Yes),
            // The schema's integers are BIGINT; a narrower column or
            // expression (a length, a literal) takes the value if it fits.
            Arg::Int(v) if *ty == Type::INT4 => checked(i32::try_from(v)?, ty, out),
            Arg::Int(v) if *ty == Type::INT2 => checked(i16::try_from(v)?, ty, out),
            Arg::Int(v) => checked(v, ty, out),
            Arg::Text(s) => checked(s, ty, out),
            Arg::Blob(b) => checked(b, ty, out),
        }
    }

    // Each variant checks its own type in `to_sql`.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// One result row.
pub enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r postgres::Row),
}

impl Row<'_> {
    /// Column `index` (from 0) as a `T`.
    pub fn get<T: FromCol>(&self, index: usize) -> Result<T, DbError> {
        match self {
            Row::Sqlite(r) => T::sqlite(r, index),
            Row::Postgres(r) => T::postgres(r, index),
        }
    }
}

/// A column's value as read from either database.
pub trait FromCol: Sized {
    fn sqlite(row: &rusqlite::Row<'_>, index: usize) -> Result<Self, DbError>;
    fn postgres(row: &postgres::Row, index: usize) -> Result<Self, DbError>;
}

fn col_err(index: usize) -> impl FnOnce(postgres::Error) -> DbError {
    move |e| DbError::Column {
        index,
        why: pg_message(&e),
    }
}

/// PostgreSQL integers of any width (`count` and BIGINT columns are
/// INT8, `length` is INT4) as an i64.
fn pg_int(row: &postgres::Row, index: usize) -> Result<Option<i64>, DbError> {
    let ty = row
        .columns()
        .get(index)
        .map(|c| c.type_().clone())
        .ok_or_else(|| DbError::Column {
            index,
            why: "no such column".into(),
        })?;
    let err = col_err(index);
    Ok(match ty {
        Type::INT2 => row
            .try_get::<_, Option<i16>>(index)
            .map_err(err)?
            .map(i64::from),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(index)
            .map_err(err)?
            .map(i64::from),
        _ => row.try_get::<_, Option<i64>>(index).map_err(err)?,
    })
}

impl FromCol for Option<i64> {
    fn sqlite(row: &rusqlite::Row<'_>, index: usize) -> Result<Self, DbError> {
        Ok(row.get(index)?)
    }
    fn postgres(row: &postgres::Row, index: usize) -> Result<Self, DbError> {
        pg_int(row, index)
    }
}

impl FromCol for i64 {
    fn sqlite(row: &rusqlite::Row<'_>, index: usize) -> Result<Self, DbError> {
        Ok(row.get(index)?)
    }
    fn postgres(row: &postgres::Row, index: usize) -> Result<Self, DbError> {
        pg_int(row, index)?.ok_or_else(|| DbError::Column {
            index,
            why: "NULL where an integer was expected".into(),
        })
    }
}

/// Types both drivers read the same way.
macro_rules! plain_col {
    ($($t:ty),*) => {$(
        impl FromCol for $t {
            fn sqlite(row: &rusqlite::Row<'_>, index: usize) -> Result<Self, DbError> {
                Ok(row.get(index)?)
            }
            fn postgres(row: &postgres::Row, index: usize) -> Result<Self, DbError> {
                row.try_get(index).map_err(col_err(index))
            }
        }
    )*};
}
plain_col!(String, Option<String>, Vec<u8>, Option<Vec<u8>>);

/// Prepared PostgreSQL statements by their text: each is parsed once per
/// connection.
type Statements = HashMap<&'static str, postgres::Statement>;

/// A connection to either database (one per store thread or replica: the
/// size of either does not matter).
#[allow(clippy::large_enum_variant)]
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres {
        client: postgres::Client,
        statements: Statements,
    },
}

impl Conn {
    pub fn postgres(client: postgres::Client) -> Self {
        Conn::Postgres {
            client,
            statements: HashMap::new(),
        }
    }

    /// Runs `f` in a transaction, committed when it says Ok and rolled
    /// back otherwise.
    pub fn transaction<R>(
        &mut self,
        f: impl FnOnce(&mut Tx<'_>) -> Result<R, DbError>,
    ) -> Result<R, DbError> {
        match self {
            Conn::Sqlite(conn) => {
                // Takes the write lock at once: another writer on the file
                // (a tool, a test) is waited for, not failed at an upgrade.
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&mut Tx::Sqlite(&tx))?;
                tx.commit()?;
                Ok(out)
            }
            Conn::Postgres { client, statements } => {
                let result = (|| {
                    let tx = client.transaction()?;
                    let mut t = Tx::Postgres { tx, statements };
                    let out = f(&mut t)?;
                    let Tx::Postgres { tx, .. } = t else {
                        unreachable!("made as Postgres above")
                    };
                    tx.commit()?;
                    Ok(out)
                })();
                if result.is_err() {
                    // A statement prepared in a transaction that failed
                    // may be gone with it: prepare afresh.
                    statements.clear();
                }
                result
            }
        }
    }

    /// Waits up to `timeout` for a notification on a channel this
    /// connection LISTENs on; whether one came (SQLite has none: it waits).
    pub fn wait_notification(&mut self, timeout: std::time::Duration) -> Result<bool, DbError> {
        match self {
            Conn::Sqlite(_) => {
                std::thread::sleep(timeout);
                Ok(false)
            }
            Conn::Postgres { client, .. } => {
                use postgres::fallible_iterator::FallibleIterator as _;
                let mut n = client.notifications();
                let came = n.timeout_iter(timeout).next()?.is_some();
                // Several may have come together: one look serves them all.
                while n.iter().next()?.is_some() {}
                Ok(came)
            }
        }
    }

    /// Whether the connection is lost for good (a new one is needed).
    pub fn is_closed(&self) -> bool {
        match self {
            Conn::Sqlite(_) => false,
            Conn::Postgres { client, .. } => client.is_closed(),
        }
    }
}

/// A transaction on either database.
pub enum Tx<'c> {
    Sqlite(&'c rusqlite::Transaction<'c>),
    Postgres {
        tx: postgres::Transaction<'c>,
        statements: &'c mut Statements,
    },
}

impl Tx<'_> {
    pub fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(_) => Dialect::Sqlite,
            Tx::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// Runs a statement; the rows it changed.
    pub fn exec(&mut self, sql: &'static str, args: &[Arg<'_>]) -> Result<u64, DbError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(args))? as u64)
            }
            Tx::Postgres { tx, statements } => {
                let stmt = prepared(tx, statements, sql)?;
                Ok(tx.execute(&stmt, &pg_args(args))?)
            }
        }
    }

    /// The first row of a query, read by `f`; None when there is none.
    pub fn query_row<T>(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Option<T>, DbError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
                match rows.next()? {
                    Some(r) => Ok(Some(f(&Row::Sqlite(r))?)),
                    None => Ok(None),
                }
            }
            Tx::Postgres { tx, statements } => {
                let stmt = prepared(tx, statements, sql)?;
                // The first row, as SQLite's: query_opt would refuse a second.
                match tx.query(&stmt, &pg_args(args))?.first() {
                    Some(r) => Ok(Some(f(&Row::Postgres(r))?)),
                    None => Ok(None),
                }
            }
        }
    }

    /// Every row of a query, each read by `f`.
    pub fn query_map<T>(
        &mut self,
        sql: &'static str,
        args: &[Arg<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T, DbError>,
    ) -> Result<Vec<T>, DbError> {
        match self {
            Tx::Sqlite(tx) => {
                let mut stmt = tx.prepare_cached(sql)?;
                let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    out.push(f(&Row::Sqlite(r))?);
                }
                Ok(out)
            }
            Tx::Postgres { tx, statements } => {
                let stmt = prepared(tx, statements, sql)?;
                tx.query(&stmt, &pg_args(args))?
                    .iter()
                    .map(|r| f(&Row::Postgres(r)))
                    .collect()
            }
        }
    }

    /// Runs several statements without arguments (a migration).
    pub fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        match self {
            Tx::Sqlite(tx) => Ok(tx.execute_batch(sql)?),
            Tx::Postgres { tx, .. } => Ok(tx.batch_execute(sql)?),
        }
    }
}

impl fmt::Debug for Tx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tx({:?})", self.dialect())
    }
}

fn pg_args<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

/// The statement for `sql`, prepared on first use with its `?N`
/// parameters written PostgreSQL's way (`$N`).
fn prepared(
    tx: &mut postgres::Transaction<'_>,
    statements: &mut Statements,
    sql: &'static str,
) -> Result<postgres::Statement, DbError> {
    if let Some(s) = statements.get(sql) {
        return Ok(s.clone());
    }
    let stmt = tx.prepare(&dollar_params(sql))?;
    statements.insert(sql, stmt.clone());
    Ok(stmt)
}

/// `?1` → `$1`: SQLite takes both, PostgreSQL only the second; statements
/// are written with `?` so that SQLite's own tools read them as they are.
fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_dollars() {
        assert_eq!(
            dollar_params("SELECT a FROM t WHERE x = ?1 AND y = ?12 OR ?"),
            "SELECT a FROM t WHERE x = $1 AND y = $12 OR ?"
        );
    }
}
