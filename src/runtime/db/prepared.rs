//! Prepared statements for fixed SQL text, with named parameters.
//!
//! `diesel::sql_query` is never prepared: diesel cannot know that its text is fixed, so it marks
//! every such query unsafe to cache, and PostgreSQL parses, analyses and plans it at every
//! execution. On the lifecycle's hot path those were most of the statements, and parsing and
//! planning them took about a sixth of the machine's CPU (`docs/performance.md`).
//! [`prepared`] takes only a `&'static str`, so its text is one of a fixed set, and diesel's
//! per-connection statement cache prepares each once: later executions are a bind and an execute
//! of the cached plan.
//!
//! Parameters are named, never numbered: the text says `$orders`, and the value is bound with
//! `.bind::<Array<Uuid>, _>("orders", …)`. Two values of the same type bound in the wrong order
//! cannot land in each other's places, and a name the text does not use, or a name used but not
//! bound, fails the statement before it reaches the database.

use diesel::pg::Pg;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::serialize::ToSql;
use diesel::sql_types::{HasSqlType, Untyped};
use diesel::{QueryResult, RunQueryDsl};

/// prepared is [`diesel::sql_query`] for SQL written into the program: its `$name` parameters
/// take the values given to [`Prepared::bind`] under those names, and the statement is prepared
/// once per connection.
pub fn prepared<'f>(sql: &'static str) -> Prepared<'f> {
    Prepared { sql, binds: Vec::new() }
}

/// Prepared is a statement built by [`prepared`].
#[must_use = "a statement runs only when executed or loaded"]
pub struct Prepared<'f> {
    sql: &'static str,
    binds: Vec<(&'static str, Box<dyn QueryFragment<Pg> + Send + 'f>)>,
}

impl<'f> Prepared<'f> {
    /// Prepared::bind gives the parameter `name` its value.
    pub fn bind<ST, V>(mut self, name: &'static str, value: V) -> Self
    where
        Pg: HasSqlType<ST>,
        V: ToSql<ST, Pg> + Send + 'f,
        ST: Send + 'f,
    {
        self.binds.push((name, Box::new(Bind::<ST, V> { value, sql_type: std::marker::PhantomData })));
        self
    }

    /// Prepared::check says whether every parameter the text's `pieces` name is bound once, and
    /// every bound value is used.
    fn check(&self, pieces: &[Piece<'_>]) -> Result<(), String> {
        let used: Vec<&str> = pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Parameter(name) => Some(*name),
                Piece::Sql(_) => None,
            })
            .collect();
        for (i, (name, _)) in self.binds.iter().enumerate() {
            if self.binds[..i].iter().any(|(other, _)| other == name) {
                return Err(format!("${name} is bound twice"));
            }
            if !used.contains(name) {
                return Err(format!("${name} is bound but not used"));
            }
        }
        match used.iter().find(|name| !self.binds.iter().any(|(bound, _)| bound == *name)) {
            Some(name) => Err(format!("${name} has no bound value")),
            None => Ok(()),
        }
    }
}

impl std::fmt::Debug for Prepared<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.binds.iter().map(|(name, _)| *name).collect();
        f.debug_struct("Prepared").field("sql", &self.sql).field("binds", &names).finish()
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

/// Piece is a stretch of a statement's text: SQL as written, or a parameter `$name`.
#[derive(Debug, PartialEq, Eq)]
enum Piece<'a> {
    Sql(&'a str),
    Parameter(&'a str),
}

/// pieces splits SQL text at its `$name` parameters, outside quoted literals and identifiers.
/// diesel numbers the parameters itself, in the order they are pushed, so a parameter written
/// twice is bound twice, to the same value. A numbered placeholder (`$1`) is refused.
fn pieces(sql: &str) -> Result<Vec<Piece<'_>>, String> {
    let bytes = sql.as_bytes();
    let (mut out, mut start, mut i) = (Vec::new(), 0, 0);
    let mut quote: Option<u8> = None;
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            // A `--` comment runs to the end of its line: what it says is no parameter, and an
            // apostrophe in it opens no literal.
            None if b == b'-' && bytes.get(i + 1) == Some(&b'-') => {
                i = bytes[i..].iter().position(|c| *c == b'\n').map_or(bytes.len(), |n| i + n);
                continue;
            }
            None if b == b'$' => {
                let rest = &bytes[i + 1..];
                let len =
                    rest.iter().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || **c == b'_').count();
                if len > 0 && rest[0].is_ascii_digit() {
                    return Err(format!("numbered placeholder ${} in {sql:?}: name it", &sql[i + 1..i + 1 + len]));
                }
                if len > 0 {
                    if start < i {
                        out.push(Piece::Sql(&sql[start..i]));
                    }
                    out.push(Piece::Parameter(&sql[i + 1..i + 1 + len]));
                    i += 1 + len;
                    start = i;
                    continue;
                }
            }
            None => {}
        }
        i += 1;
    }
    if start < sql.len() {
        out.push(Piece::Sql(&sql[start..]));
    }
    Ok(out)
}

impl QueryFragment<Pg> for Prepared<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        let error = |e: String| diesel::result::Error::QueryBuilderError(format!("{e} in {:?}", self.sql).into());
        let pieces = pieces(self.sql).map_err(error)?;
        self.check(&pieces).map_err(error)?;
        for piece in pieces {
            match piece {
                Piece::Sql(sql) => out.push_sql(sql),
                Piece::Parameter(name) => {
                    let (_, bind) = self.binds.iter().find(|(bound, _)| *bound == name).expect("checked");
                    bind.walk_ast(out.reborrow())?;
                }
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
    use diesel::sql_types::{Int4, Text};

    use super::*;

    #[test]
    fn parameters_are_found_by_name_and_repeated_ones_kept() {
        assert_eq!(
            pieces("SELECT $ids::int[], $at WHERE a = $ids AND b::text = 'x'"),
            Ok(vec![
                Piece::Sql("SELECT "),
                Piece::Parameter("ids"),
                Piece::Sql("::int[], "),
                Piece::Parameter("at"),
                Piece::Sql(" WHERE a = "),
                Piece::Parameter("ids"),
                Piece::Sql(" AND b::text = 'x'"),
            ])
        );
        assert_eq!(pieces("SELECT 1"), Ok(vec![Piece::Sql("SELECT 1")]));
        assert_eq!(pieces("$a"), Ok(vec![Piece::Parameter("a")]));
        // A dollar sign without a name, or inside a literal, is not a parameter.
        assert_eq!(pieces("SELECT '$' || $b"), Ok(vec![Piece::Sql("SELECT '$' || "), Piece::Parameter("b")]));
        assert_eq!(pieces("SELECT '$x'"), Ok(vec![Piece::Sql("SELECT '$x'")]));
        // Nor is one in a comment, whose apostrophe opens no literal either.
        assert_eq!(
            pieces("SELECT 1 -- the asset's $id\n, $b"),
            Ok(vec![Piece::Sql("SELECT 1 -- the asset's $id\n, "), Piece::Parameter("b")])
        );
    }

    #[test]
    fn a_numbered_placeholder_is_refused() {
        assert!(pieces("SELECT $1").unwrap_err().contains("name it"));
    }

    #[test]
    fn every_parameter_must_be_bound_once_and_every_bound_value_used() {
        let ok = prepared("SELECT $a, $b, $a").bind::<Int4, _>("b", 2).bind::<Text, _>("a", "x");
        assert_eq!(ok.check(&pieces(ok.sql).unwrap()), Ok(()), "bound in any order");
        let missing = prepared("SELECT $a, $b").bind::<Int4, _>("a", 1);
        assert_eq!(missing.check(&pieces(missing.sql).unwrap()), Err("$b has no bound value".into()));
        let unused = prepared("SELECT $a").bind::<Int4, _>("a", 1).bind::<Int4, _>("c", 3);
        assert_eq!(unused.check(&pieces(unused.sql).unwrap()), Err("$c is bound but not used".into()));
        let twice = prepared("SELECT $a").bind::<Int4, _>("a", 1).bind::<Int4, _>("a", 2);
        assert_eq!(twice.check(&pieces(twice.sql).unwrap()), Err("$a is bound twice".into()));
    }
}
