//! Actor timers on a [`Clock`]: what `ctx.run_later` / `ctx.run_interval`
//! do, waiting on the bus's clock, so a manual clock drives them (the test
//! kit) and the system clock keeps actix's own timers (production).
//!
//! Every time-driven part of the embedded backend (the persistence actor's
//! retention and offset commits here; retries, delayed messages,
//! transaction checks, consume timeouts and rate limits in `weirmq-actors`)
//! arms its timers through these two functions.

use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use weirmq_bus::Clock;

/// Runs `f` once, `d` from now on `clock`. The handle cancels it
/// (`ctx.cancel_future`).
pub fn run_later<A, F>(ctx: &mut Context<A>, clock: &Clock, d: Duration, f: F) -> SpawnHandle
where
    A: Actor<Context = Context<A>>,
    F: FnOnce(&mut A, &mut Context<A>) + 'static,
{
    if !clock.is_manual() {
        return ctx.run_later(d, f);
    }
    ctx.spawn(actix::fut::wrap_future::<_, A>(clock.sleep(d)).map(move |_, act, ctx| f(act, ctx)))
}

/// What an interval runs, shared by its re-armed timers.
type Tick<A> = Rc<dyn Fn(&mut A, &mut Context<A>)>;

/// Runs `f` every `d` on `clock`, for as long as the actor lives.
pub fn run_interval<A, F>(ctx: &mut Context<A>, clock: &Clock, d: Duration, f: F)
where
    A: Actor<Context = Context<A>>,
    F: Fn(&mut A, &mut Context<A>) + 'static,
{
    if !clock.is_manual() {
        ctx.run_interval(d, f);
        return;
    }
    fn again<A: Actor<Context = Context<A>>>(
        ctx: &mut Context<A>,
        clock: Clock,
        d: Duration,
        f: Tick<A>,
    ) {
        let c = clock.clone();
        run_later(ctx, &c, d, move |act, ctx| {
            f(act, ctx);
            again(ctx, clock, d, f);
        });
    }
    again(ctx, clock.clone(), d, Rc::new(f));
}
