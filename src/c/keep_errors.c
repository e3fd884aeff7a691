/*
 * mmts's one piece of C: PG_TRY / PG_RE_THROW are macros around sigsetjmp, which Rust cannot
 * express. See src/pg_internals.rs (keeping_errors) for why and how it is used.
 */
#include "postgres.h"

/*
 * Runs body(arg). An error raised inside runs on_error(arg), then goes on exactly as it was
 * raised: PG_RE_THROW keeps its ErrorData whole (SQLSTATE, detail, hint, CONTEXT, the names
 * of the constraint and table, the position).
 */
void
mmts_keeping_errors(void (*body) (void *), void (*on_error) (void *), void *arg)
{
	PG_TRY();
	{
		body(arg);
	}
	PG_CATCH();
	{
		on_error(arg);
		PG_RE_THROW();
	}
	PG_END_TRY();
}
