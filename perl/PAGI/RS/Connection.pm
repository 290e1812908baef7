package PAGI::RS::Connection;

# The `pagi.connection` interface (Spec/Www.pod 0.6, "Connection State"):
# one object per http, websocket and sse scope, reporting how the scope
# ends: cleanly (on_complete) or abnormally (on_disconnect, with a reason
# token and a detail), and on_end / end_future for either.
#
# The network core decides the outcome (the first end wins, there); this
# object caches it once it is known.  Until then every fact is read from the
# core, so facts are current even while the message announcing the end is
# still queued.  Notifications (futures, callbacks, and the settlement of a
# pending receive or send) always run from the event loop, never inside the
# application's own call into $send, $receive or abort, and always after
# the facts are set.
#
# The methods work on the per-request object (PAGI::RS::HTTP and its
# subclasses), which also provides pagi.transport: one array per request
# instead of three objects.  Its slot numbers (ID to WANTS_END belong to this
# file) are shared with the C layer: request.c builds the array, send.c's
# $send writes some of them.  They come from src/interp/constants.def, as do
# the codes of _query and _end_state.
#
# Slots of this file: CONNECTED is 1 until the end is known here; COMPLETE,
# the terminal response event was accepted; FUTURE and END_FUTURE hold
# disconnect_future's and end_future's private masters; NOTIFIED is 1 once
# delivery is scheduled, 2 once delivered; WANTS_END, someone waits to hear
# how it ends (send.c reads it).

use strict;
use warnings;
use PAGI::RS::Constants qw(slot end_state query log);
use PAGI::RS::Pending;

sub is_connected {
    my ($self) = @_;
    _sync($self) if $self->[CONNECTED];
    return $self->[CONNECTED] ? 1 : 0;
}

sub disconnect_reason {
    _sync( $_[0] ) if $_[0][CONNECTED];
    return $_[0][REASON];
}

sub disconnect_detail {
    _sync( $_[0] ) if $_[0][CONNECTED];
    return $_[0][DETAIL];
}

sub response_started { $_[0][STARTED] ? 1 : 0 }

# True only after a clean end (false while active and after an abnormal one).
sub response_complete {
    _sync( $_[0] ) if $_[0][CONNECTED];
    return $_[0][COMPLETED_CLEANLY] ? 1 : 0;
}

# The peer's WebSocket Close (undef on http and sse, and until it came).
sub close_code {
    _sync( $_[0] ) if $_[0][CONNECTED];
    return $_[0][CLOSE_CODE];
}

sub close_reason {
    _sync( $_[0] ) if $_[0][CONNECTED];
    return $_[0][CLOSE_REASON];
}

sub on_disconnect {
    my ( $self, $cb ) = @_;
    _sync($self) if $self->[CONNECTED];
    if ( !$self->[CONNECTED] ) {
        # After the end: now, if it was abnormal; never, if clean.
        _call( 'on_disconnect', $cb, $self->[REASON], $self->[DETAIL] )
          unless $self->[COMPLETED_CLEANLY];
        return;
    }
    push @{ $self->[ON_DISCONNECT] }, $cb;
    $self->_want_terminal;
    return;
}

sub on_complete {
    my ( $self, $cb ) = @_;
    _sync($self) if $self->[CONNECTED];
    if ( !$self->[CONNECTED] ) {
        _call( 'on_complete', $cb ) if $self->[COMPLETED_CLEANLY];
        return;
    }
    push @{ $self->[ON_COMPLETE] }, $cb;
    $self->_want_terminal;
    return;
}

# Either end: ($reason, $detail), both undef after a clean one.
sub on_end {
    my ( $self, $cb ) = @_;
    _sync($self) if $self->[CONNECTED];
    if ( !$self->[CONNECTED] ) {
        _call( 'on_end', $cb, $self->[REASON], $self->[DETAIL] );
        return;
    }
    push @{ $self->[ON_END] }, $cb;
    $self->_want_terminal;
    return;
}

# A new Future per call (cancelling one touches no other), resolving with
# the reason on an abnormal end and staying pending after a clean one.
sub disconnect_future {
    my ($self) = @_;
    _sync($self) if $self->[CONNECTED];
    my $master = $self->[FUTURE] //= do {
        $self->_want_terminal if $self->[CONNECTED];
        PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
    };
    $master->done( $self->[REASON] )
      if !$self->[CONNECTED] && defined $self->[REASON] && !$master->is_ready && ( $self->[NOTIFIED] // 0 ) != 1;
    return $master->without_cancel;
}

# Resolves on either end: with the reason token, or undef after a clean one.
sub end_future {
    my ($self) = @_;
    _sync($self) if $self->[CONNECTED];
    my $master = $self->[END_FUTURE] //= do {
        $self->_want_terminal if $self->[CONNECTED];
        PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
    };
    $master->done( $self->[REASON] )
      if !$self->[CONNECTED] && !$master->is_ready && ( $self->[NOTIFIED] // 0 ) != 1;
    return $master->without_cancel;
}

# End the scope now (app_abort): the core closes the connection (or, on an
# accepted WebSocket, drops it with no Close frame) without waiting for
# queued writes.  A no-op once the scope has ended.
sub abort {
    my ( $self, $detail ) = @_;
    _sync($self) if $self->[CONNECTED];
    return unless $self->[CONNECTED];
    $detail = "$detail" if defined $detail;
    if ( PAGI::RS::_abort( $self->[ID], $detail ) ) {
        $self->_notify_later if $self->_terminal( 0, 'app_abort', $detail );
    }
    else {
        _sync($self);
    }
    return;
}

# ---- the server's side ------------------------------------------------------

# Ask the core for the outcome; if it has one this side has not seen, take
# it (facts now, notifications from the loop).
sub _sync {
    my ($self) = @_;
    my ( $state, $reason, $detail, $peer_code, $peer_reason, $event_code ) = PAGI::RS::_end_state( $self->[ID] );
    return if $state == END_ACTIVE || $state == END_FORGOTTEN;
    $self->_terminal( $state == END_CLEAN, $reason, $detail, $peer_code, $peer_reason, $event_code )
      and $self->_notify_later;
    return;
}

# Record the outcome (facts only).  Returns 1 if it is news.
sub _terminal {
    my ( $self, $clean, $reason, $detail, $close_code, $close_reason ) = @_;
    return 0 unless $self->[CONNECTED];
    $self->[CONNECTED] = 0;
    if ($clean) {
        $self->[COMPLETED_CLEANLY] = 1;
    }
    else {
        $self->[REASON] = $reason // 'unknown';
        $self->[DETAIL] = $detail;
    }
    $self->[CLOSE_CODE]   = $close_code;
    $self->[CLOSE_REASON] = defined $close_reason && length $close_reason ? $close_reason : undef;
    return 1;
}

sub _notify_later {
    my ($self) = @_;
    return if $self->[NOTIFIED];
    $self->[NOTIFIED] = 1;
    $PAGI::RS::Bridge::LOOP->later( sub { $self->_notify } );
    return;
}

# The notifications of the end, in the spec's order: for an abnormal end
# disconnect_future, on_disconnect, then the either-end pair; then the
# pending receive and sends settle (the subclass's _settle).  Each callback
# runs even if another died.  References to callbacks are released.
sub _notify {
    my ($self) = @_;
    return if ( $self->[NOTIFIED] // 0 ) == 2;
    $self->[NOTIFIED] = 2;
    my ( $on_disconnect, $on_complete, $on_end ) = @$self[ ON_DISCONNECT, ON_COMPLETE, ON_END ];
    @$self[ ON_DISCONNECT, ON_COMPLETE, ON_END ] = ( undef, undef, undef );
    my ( $reason, $detail ) = @$self[ REASON, DETAIL ];
    if ( $self->[COMPLETED_CLEANLY] ) {
        _call( 'on_complete', $_ ) for @{ $on_complete // [] };
    }
    else {
        my $f = $self->[FUTURE];
        $f->done($reason) if $f && !$f->is_ready;
        _call( 'on_disconnect', $_, $reason, $detail ) for @{ $on_disconnect // [] };
    }
    my $end = $self->[END_FUTURE];
    $end->done($reason) if $end && !$end->is_ready;
    _call( 'on_end', $_, $reason, $detail ) for @{ $on_end // [] };
    $self->_settle( $self->[COMPLETED_CLEANLY] );
    return;
}

# Settle what the application is waiting on after the end ($clean: a clean
# one); subclasses know what that is.
sub _settle { return }

# Someone waits to hear how the scope ends, maybe after the app returned:
# the core will say so, and $send's fast path leaves terminal events to
# Perl, which notifies.
sub _want_terminal {
    return if $_[0][WANTS_END]++;
    PAGI::RS::_query( $_[0][ID], Q_WANT_TERMINAL );
    return;
}

# No more events are needed for this request: leave the registry Bridge.pm
# routes the core's messages through, and let the core forget it too.
sub _forget {
    my ($self) = @_;
    delete $PAGI::RS::Bridge::REQUESTS{ $self->[ID] };
    PAGI::RS::_release( $self->[ID] );
    return;
}

# Does anyone wait to hear how this request ends?  (Every request asks, as
# its app returns: one slice and no loop keeps it cheap.)
sub _has_callbacks {
    my ( $complete, $disconnect, $end, $future, $end_future ) =
      @{ $_[0] }[ ON_COMPLETE, ON_DISCONNECT, ON_END, FUTURE, END_FUTURE ];
    return 1 if $complete && @$complete || $disconnect && @$disconnect || $end && @$end;
    return 1 if $future && !$future->is_ready || $end_future && !$end_future->is_ready;
    return 0;
}

sub _call {
    my ( $what, $cb, @args ) = @_;
    return if eval { $cb->(@args); 1 };
    PAGI::RS::_log( LOG_ERROR + LOG_FROM_CONNECTION_STATE, "pagi.connection $what callback error: $@" );
}

1;
