//! Prepared statements for fixed SQL text.
//!
//! `diesel::sql_query` is never prepared: diesel cannot know that its text is fixed, so it marks
//! every such query unsafe to cache, and PostgreSQL parses, analyses and plans it at every
//! execution. On the lifecycle's hot path those were most of the statements, and parsing and
//! planning them took about a sixth of the machine's CPU (`perf`, README "Performance").
//! [`prepared`] takes only a `&'static str`, so its text is one of a fixed set, and diesel's
//! per-connection statement cache prepares each once: later executions are a bind and an execute
//! of the cached plan.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::{QueryResult, RunQueryDsl};

/// prepared is [`diesel::sql_query`] for SQL written into the program: its `$1`, `$2`…
/// placeholders take the values given to [`Prepared::bind`], in order, and the statement is
/// prepared once per connection.
pub fn prepared<'f>(sql: &'static str) -> Prepared<'f> {
    Prepared { sql, binds: Vec::new() }
}

/// Prepared is a statement built by [`prepared`].
#[must_use = "a statement runs only when executed or loaded"]
pub struct Prepared<'f> {
    sql: &'static str,
    binds: Vec<Box<dyn QueryFragment<Pg> + Send + 'f>>,
}

impl<'f> Prepared<'f> {
    /// Prepared::bind gives the next placeholder its value, as `sql_query(…).bind` does.
    pub fn bind<ST, V>(mut self, value: V) -> Self
    where
        Pg: HasSqlType<ST>,
        V: ToSql<ST, Pg> + Send + 'f,
        ST: Send + 'f,
    {
        self.binds.push(Box::new(Bind::<ST, V> { value, sql_type: std::marker::PhantomData }));
        self
    }
}

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("sql", &self.sql).field("binds", &self.binds.len()).finish()
    }
}

/// Bind is one value of a [`Prepared`] statement.
struct Bind<ST, V> {
    value: V,
    sql_type: std::marker::PhantomData<ST>,
}

impl<ST, V> QueryFragment<Pg> for Bind<ST, V>
where
    Pg: HasSqlType<ST>,
    V: ToSql<ST, Pg>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, V>(&self.value)
    }
}

/// Piece is a stretch of a statement's text: SQL as written, or the placeholder `$n`.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Sql(&'a str),
    Placeholder(usize),
}

/// pieces splits SQL text at its `$n` placeholders. diesel numbers the parameters itself, in the
/// order they are pushed, so a placeholder written twice is bound twice, to the same value.
fn pieces(sql: &str) -> Vec<Piece<'_>> {
    let bytes = sql.as_bytes();
    let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
    while i < bytes.len() {
        let digits = bytes[i + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if bytes[i] == b'$' && digits > 0 {
            if start < i {
                out.push(Piece::Sql(&sql[start..i]));
            }
            out.push(Piece::Placeholder(sql[i + 1..i + 1 + digits].parse().expect("ASCII digits")));
            i += 1 + digits;
            start = i;
        } else {
            i += 1;
        }
    }
    if start < sql.len() {
        out.push(Piece::Sql(&sql[start..]));
    }
    out
}

impl QueryFragment<Pg> for Prepared<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        for piece in pieces(self.sql) {
            match piece {
                Piece::Sql(sql) => out.push_sql(sql),
                Piece::Placeholder(n) => match n.checked_sub(1).and_then(|i| self.binds.get(i)) {
                    Some(bind) => bind.walk_ast(out.reborrow())?,
                    None => {
                        return Err(diesel::result::Error::QueryBuilderError(
                            format!("${n} has no bound value ({} bound) in {:?}", self.binds.len(), self.sql).into(),
                        ));
                    }
                },
            }
        }
        Ok(())
    }
}

impl QueryId for Prepared<'_> {
    // The text is the cache key: diesel caches a statement without a static id by its SQL and
    // its bind types, and a `&'static str` keeps that set as small as the program.
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Prepared<'_> {
    type SqlType = Untyped;
}

impl<Conn> RunQueryDsl<Conn> for Prepared<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_found_in_order_and_repeated_ones_kept() {
        assert_eq!(
            pieces("SELECT $1::int[], $12 WHERE a = $1 AND b::text = 'x'"),
            vec![
                Piece::Sql("SELECT "),
                Piece::Placeholder(1),
                Piece::Sql("::int[], "),
                Piece::Placeholder(12),
                Piece::Sql(" WHERE a = "),
                Piece::Placeholder(1),
                Piece::Sql(" AND b::text = 'x'"),
            ]
        );
        assert_eq!(pieces("SELECT 1"), vec![Piece::Sql("SELECT 1")]);
        assert_eq!(pieces("$1"), vec![Piece::Placeholder(1)]);
        // A dollar sign without digits is not a placeholder.
        assert_eq!(pieces("SELECT '$' || $2"), vec![Piece::Sql("SELECT '$' || "), Piece::Placeholder(2)]);
    }
}
