//! [`Members`]: how many handler actors a subscription has, how they are
//! made, and which threads they run on.
//!
//! Three placements, one handler type (an ordinary `Actor<Context =
//! Context<A>>`):
//!
//! * **local** ([`Members::local`]): on the arbiter that starts the
//!   subscription, beside its supervisor — cheapest (no thread crossing per
//!   delivery); right for handlers that do not block their thread (async
//!   I/O in a `ResponseFuture`, short computations).
//! * **own threads** ([`Members::threads`]): each member on a new arbiter
//!   (one OS thread) that the subscription owns and stops when it ends —
//!   for handlers that block (`std::thread::sleep`, blocking I/O, CPU work
//!   longer than a millisecond or so): a blocked member stalls only itself.
//! * **on an arbiter of yours** ([`Members::on`]): every member on an
//!   arbiter the application started (e.g. one thread shared by several
//!   blocking subscriptions); the application stops it.
//!
//! A member that panics is replaced by a fresh one from the factory, on the
//! same thread (placement) as before.
//!
//! # Shutdown
//!
//! Threads the subscription owns are stopped when its supervisor stops
//! (after a drain: no delivery is in their hands then).

use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;

/// actix's default mailbox capacity (its `mailbox::DEFAULT_CAPACITY`, not
/// exported).
const DEFAULT_MAILBOX: usize = 16;

/// Makes a handler actor; shared by every member of a placement.
type Factory<A> = Arc<dyn Fn() -> A + Send + Sync>;

enum Placement<A> {
    Local(Rc<dyn Fn() -> A>),
    Threads(Factory<A>),
    On(ArbiterHandle, Factory<A>),
}

impl<A> Clone for Placement<A> {
    fn clone(&self) -> Self {
        match self {
            Placement::Local(f) => Placement::Local(f.clone()),
            Placement::Threads(f) => Placement::Threads(f.clone()),
            Placement::On(a, f) => Placement::On(a.clone(), f.clone()),
        }
    }
}

/// A subscription's handler actors: how many, made by which factory, on
/// which threads. See the module docs.
///
/// # Examples
///
/// ```
/// use actix::prelude::*;
/// use weirmq_actors::Members;
/// struct Worker;
/// impl Actor for Worker { type Context = Context<Self>; }
/// let here = Members::local(4, || Worker);              // beside the supervisor
/// let apart = Members::threads(2, || Worker);           // a thread per member
/// assert_eq!((here.count(), apart.count()), (4, 2));
/// ```
pub struct Members<A> {
    count: usize,
    placement: Placement<A>,
}

impl<A> Clone for Members<A> {
    fn clone(&self) -> Self {
        Members {
            count: self.count,
            placement: self.placement.clone(),
        }
    }
}

impl<A> fmt::Debug for Members<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let placement = match &self.placement {
            Placement::Local(_) => "local",
            Placement::Threads(_) => "own threads",
            Placement::On(..) => "application arbiter",
        };
        f.debug_struct("Members")
            .field("count", &self.count)
            .field("placement", &placement)
            .finish()
    }
}

impl<A> Members<A>
where
    A: Actor<Context = Context<A>>,
{
    /// `count` members made by `factory`, on the arbiter that starts the
    /// subscription.
    pub fn local(count: usize, factory: impl Fn() -> A + 'static) -> Self {
        Members {
            count,
            placement: Placement::Local(Rc::new(factory)),
        }
    }

    /// `count` members, each on a thread (arbiter) of its own that the
    /// subscription starts and stops: for handlers that block.
    pub fn threads(count: usize, factory: impl Fn() -> A + Send + Sync + 'static) -> Self {
        Members {
            count,
            placement: Placement::Threads(Arc::new(factory)),
        }
    }

    /// `count` members, all on `arbiter` (which the application owns and
    /// stops).
    pub fn on(
        arbiter: ArbiterHandle,
        count: usize,
        factory: impl Fn() -> A + Send + Sync + 'static,
    ) -> Self {
        Members {
            count,
            placement: Placement::On(arbiter, Arc::new(factory)),
        }
    }

    /// How many members.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The same factory and placement with `count` members.
    pub fn with_count(mut self, count: usize) -> Self {
        self.count = count;
        self
    }

    /// Whether the members run on threads other than the supervisor's.
    pub fn is_remote(&self) -> bool {
        !matches!(self.placement, Placement::Local(_))
    }

    /// Starts the threads this placement owns; answers what starts member
    /// `j` (again, after a panic) and those threads.
    ///
    /// Each member's mailbox holds at least `in_hand` messages (the most
    /// deliveries the supervisor gives one member at once): with actix's
    /// default of 16, a supervisor handing out more found the mailbox full
    /// and every further delivery took actix's slow path (the request
    /// parked, a cloned sender, a second send when the member woke it). A
    /// handler that sets its own capacity in `started` keeps it.
    pub(crate) fn into_spawner(self, in_hand: usize) -> Spawner<A> {
        let capacity = in_hand.max(DEFAULT_MAILBOX);
        match self.placement {
            Placement::Local(f) => Spawner {
                spawn: Box::new(move |_| A::create(sized(capacity, &*f))),
                owned: Vec::new(),
            },
            Placement::On(arbiter, f) => Spawner {
                spawn: Box::new(move |_| {
                    let f = f.clone();
                    A::start_in_arbiter(&arbiter, sized(capacity, move || f()))
                }),
                owned: Vec::new(),
            },
            Placement::Threads(f) => {
                let owned: Vec<Arbiter> = (0..self.count).map(|_| Arbiter::new()).collect();
                let handles: Vec<ArbiterHandle> = owned.iter().map(Arbiter::handle).collect();
                Spawner {
                    spawn: Box::new(move |j| {
                        let f = f.clone();
                        A::start_in_arbiter(
                            &handles[j % handles.len()],
                            sized(capacity, move || f()),
                        )
                    }),
                    owned,
                }
            }
        }
    }
}

/// What makes a member in its new context: the mailbox set to hold
/// `capacity` messages (see `Members::into_spawner`), then the actor.
fn sized<A: Actor<Context = Context<A>>>(
    capacity: usize,
    make: impl FnOnce() -> A,
) -> impl FnOnce(&mut Context<A>) -> A {
    move |ctx| {
        ctx.set_mailbox_capacity(capacity);
        make()
    }
}

/// Starts member `j` where its placement says; owns the placement's threads.
pub(crate) struct Spawner<A: Actor> {
    pub(crate) spawn: Box<dyn Fn(usize) -> Addr<A>>,
    pub(crate) owned: Vec<Arbiter>,
}

impl<A: Actor> Spawner<A> {
    /// Stops the threads this placement started (their actors with them).
    pub(crate) fn stop_threads(&mut self) {
        for a in self.owned.drain(..) {
            a.stop();
        }
    }
}
