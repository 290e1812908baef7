package PAGI::RS::HTTP;

# One HTTP request on the Perl side: builds the scope, provides $receive and
# $send, and relays their effects to the network core.  Sequencing rules and
# header validation live in Rust (src/exchange/); this file maps events to
# those calls and settles the application's Futures.

use strict;
use warnings;
use Future;
use Scalar::Util qw(blessed refaddr);
use PAGI::RS::Connection;
use PAGI::RS::Pending;
use PAGI::RS::Transport;

# The request object is also the scope's pagi.connection and pagi.transport.
our @ISA = ( 'PAGI::RS::Connection', 'PAGI::RS::Transport' );

# Slot numbers (Connection.pm's and Transport.pm's, then this file's from
# QUEUE to SEND_BUSY; SSE.pm and WebSocket.pm add theirs after), the core's
# send and finish codes, what fast_send.c's fast path sent (SENT_*), and body
# delivery states (BODY_*): shared with Rust and the C layer, whose $send
# (send.c) updates STARTED, COMPLETE and TRAILERS itself and reads RECV_WAIT
# and SEND_BUSY.
use PAGI::RS::Constants qw(slot send finish send_kind body query log);

# The Future every send that completes at once returns (send.c returns it
# too).  It is always done, so its class answers Future::AsyncAwait's
# questions directly instead of through two method calls per await.
{
    package PAGI::RS::SentFuture;
    our @ISA = ('Future');
    # Inside pagi-rs they are XS (send.c): no Perl ops per await.
    if ( defined &_c_yes ) {
        *AWAIT_IS_READY     = \&_c_yes;
        *AWAIT_IS_CANCELLED = \&_c_no;
        *AWAIT_GET          = \&_c_nothing;
        *AWAIT_RESULT       = \&_c_nothing;
    }
    else {
        *AWAIT_IS_READY     = sub { 1 };
        *AWAIT_IS_CANCELLED = sub { 0 };
        *AWAIT_GET          = sub { return };
        *AWAIT_RESULT       = sub { return };
    }
    # Never pending, so never the prototype of a pending Future; if asked,
    # hand out a plain one.
    sub AWAIT_CLONE { Future->new }
}
our $DONE = PAGI::RS::SentFuture->done;

# Classes already seen to be Futures (the app's returned Future is usually
# a Future or IO::Async::Future): saves an isa() per request.
my %IS_FUTURE;

# A new request: request.c has built the request object (registered in
# %PAGI::RS::Bridge::REQUESTS, and the scope's pagi.connection and
# pagi.transport), the scope and $send.  Run the app.  http requests take
# http_app.c's version of this (its $receive is an XS closure, and it ends
# the request itself when the app's Future is done at once); sse and
# websocket requests come here with their own $receive, and end with their
# own _app_done.
sub run_app {
    my ( $self, $scope, $send, $receive ) = @_;
    my $f = eval { $PAGI::RS::Bridge::APP->( $scope, $receive, $send ) };
    _app_returned( $self, $f, defined $f ? undef : $@ );
    return;
}

# The application's call returned $f, or died with $err.  (http_app.c ends
# the request itself when $f is done, and waits for a pending $f itself;
# it calls _app_ready for a Future that failed or was cancelled.)
sub _app_returned {
    my ( $self, $f, $err ) = @_;
    if ( !defined $f ) {
        $self->_app_done( defined $err && $err ne '' ? $err : undef );
    }
    elsif ( !( $IS_FUTURE{ ref $f } //= blessed($f) && $f->isa('Future') ? 1 : 0 ) ) {
        $self->_app_done(undef);
    }
    elsif ( $f->is_done ) {
        $self->_app_done(undef);
    }
    elsif ( $f->is_ready ) {
        _app_ready( $self, $f );
    }
    else {
        # Keep the app's Future alive: nothing else may hold it.
        $self->[APP_FUTURE] = $f;
        $f->on_ready( sub { _app_ready( $self, shift ) } );
    }
    return;
}

sub _app_ready {
    my ( $self, $f ) = @_;
    $self->[APP_FUTURE] = undef;
    if ( $f->is_failed ) {
        my ($err) = $f->failure;
        $self->_app_done( defined $err ? $err : 'application Future failed' );
    }
    elsif ( $f->is_cancelled ) {
        $self->_app_done('application Future was cancelled');
    }
    else {
        $self->_app_done(undef);
    }
    return;
}

sub _app_done {
    my ( $self, $err ) = @_;
    return if $self->[APP_DONE]++;
    # Keep listening only if someone registered for the request's end, or a
    # send the app did not await still waits for the drain or the flush: the
    # core's news settles it (Www 0.5: a pending send resolves), and without
    # the registry that news would find no one.
    my $keep = ( $self->[CONNECTED] && PAGI::RS::Connection::_has_callbacks($self) ) || _send_waiting($self) ? 1 : 0;
    _finished( $self, PAGI::RS::_finish( $self->[ID], $err, $keep ), $keep );
    return;
}

sub _send_waiting {
    my ($self) = @_;
    for my $f ( $self->[SEND_WAIT], $self->[DEFER_WAIT] ) {
        return 1 if $f && !$f->is_ready;
    }
    return 0;
}

# The core's answer ($rc) to the end of the app, which asked it to $keep the
# request for callbacks or not.  (http_app.c calls this for the uncommon
# answers.)
sub _finished {
    my ( $self, $rc, $keep ) = @_;
    if ( $rc == FIN_BACKSTOP || $rc == FIN_TRUNCATED ) {
        # The core ended the scope server_error (it keeps it until we have
        # read why): the backstop 500 counts as a started response.
        $self->[STARTED] = 1 if $rc == FIN_BACKSTOP;
        $self->_sync;
        $self->_forget unless $keep;
    }
    elsif ( !$keep ) {
        delete $PAGI::RS::Bridge::REQUESTS{ $self->[ID] };
    }
    return;
}


# ---- $receive -------------------------------------------------------------

sub _receive {
    my ($self) = @_;
    # Once the response is complete the scope has ended: a receive reports
    # that end, not the request body, read or not (Www 0.6, "Disconnect -
    # receive event"; the reference server does the same).  Nothing would
    # fetch the rest of the body for it: the core stops reading a request
    # whose exchange is over, so a receive waiting here would wait for ever.
    return $self->_disconnect_event if $self->[COMPLETE];
    my $q = $self->[QUEUE];
    if ( $q && @$q ) {
        my $ev = shift @$q;
        PAGI::RS::_want_body( $self->[ID] ) if $ev->{more};
        return Future->done($ev);
    }
    if ( !$self->[CONNECTED] || $self->[COMPLETED_CLEANLY] ) {
        return $self->_disconnect_event unless _body_on_its_way($self);
        # The end is known (read from the core), but body chunks that
        # arrived before it are still queued for this interpreter: they come
        # first, and _on_body hands the next one to this receive.
        my $pending = $self->[RECV_WAIT];
        return _receive_after_earlier( $self, $pending ) if $pending && !$pending->is_ready;
        return $self->[RECV_WAIT] = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
    }
    my $body = $self->[BODY];
    if ( $body == BODY_EMPTY ) {
        $self->[BODY] = BODY_DONE;
        return Future->done( { type => 'http.request', body => '', more => 0 } );
    }
    if ( $body == BODY_AWAIT_CONTINUE ) {
        # First read: now the core may answer 100 Continue and read.
        $self->[BODY] = BODY_STREAMING;
        PAGI::RS::_want_body( $self->[ID] );
    }
    if ( my $pending = $self->[RECV_WAIT] ) {
        return _receive_after_earlier( $self, $pending ) unless $pending->is_ready;
    }
    return $self->[RECV_WAIT] = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
}

# A receive made while an earlier one still waits gets the event after
# that one's, not the same one: handing both the same body chunk would give
# the app its bytes twice (PAGI::RS::Pending::after).  Under SSE.pm this is
# the http receive, which SSE.pm renames.
sub _receive_after_earlier {
    my ( $self, $earlier ) = @_;
    return PAGI::RS::Pending::after( $earlier, sub { _receive($self) } );
}

# Body chunks the core has queued for this interpreter and it has not yet
# dispatched: the end may be known here before they are (pagi.connection
# reads the core's facts directly), but it must not overtake them.
sub _body_on_its_way {
    my ($self) = @_;
    return 0 if $self->[BODY] == BODY_DONE || $self->[BODY] == BODY_EMPTY;
    return ( PAGI::RS::_query( $self->[ID], Q_BODY_PENDING ) // 0 ) > 0;
}

sub _disconnect_event {
    my ($self) = @_;
    my $refused = _past_disconnect_receives( $self, 'http' );
    return $refused if $refused;
    return Future->done( { type => 'http.disconnect' } );
}

# Receives after the end get the disconnect event again, up to
# --max-disconnect-receives (0: for ever, as in the reference server); then
# they fail, so that an app polling $receive without checking the type does
# not spin for ever.
sub _past_disconnect_receives {
    my ( $self, $type ) = @_;
    my $max = $PAGI::RS::Bridge::MAX_DISCONNECT_RECEIVES;
    return if !$max;
    my $n = ++$self->[DISCONNECT_RECEIVES];
    return if $n <= $max;
    PAGI::RS::_log( LOG_ERROR + LOG_FROM_CONNECTION, "$type scope: receive() called $n times after the scope ended" )
      if $n == $max + 1;
    return Future->fail( "receive() called $n times after the scope ended; "
          . "the application is not checking for $type.disconnect\n" );
}

sub _on_body {
    my ( $self, $data, $more ) = @_;
    # A chunk the core sent before the response completed: no receive will
    # report it (_receive).
    return if $self->[COMPLETE];
    my $ev = { type => 'http.request', body => $data, more => $more ? 1 : 0 };
    $self->[BODY] = BODY_DONE unless $more;
    my $wait = $self->[RECV_WAIT];
    if ( $wait && !$wait->is_ready ) {
        $self->[RECV_WAIT] = undef;
        PAGI::RS::_want_body( $self->[ID] ) if $more;
        $wait->done($ev);
    }
    else {
        push @{ $self->[QUEUE] //= [] }, $ev;
    }
    return;
}

# ---- $send ------------------------------------------------------------------

# Sends on one scope are sequential.  A send made while an earlier one is
# still in flight (its Future pending: a file or fh body streaming, a body
# waiting for the buffer to drain, a fullflush) waits its turn, as with the
# reference helpers: it is made when the earlier one settles, so bytes never
# interleave and every Future settles.  SEND_BUSY holds the Future of the
# last send in flight; send.c's $send skips its fast path while it is set
# (IN_TURN).  The application gets a copy of each pending Future: cancelling
# it does not make the next send jump the queue.

# $send's Perl half: send.c's sender has tried the fast path (code $rc,
# kind $what) and hands over whatever needs Perl: waits, failures, the other
# events (NEEDS_PERL), and sends that must wait their turn (IN_TURN).
# (The same for sse and websocket scopes: their classes say what their
# fast path's outcome means, in _send_outcome.)
sub _after_send {
    my ( $self, $ev, $rc, $what ) = @_;
    return _send_in_turn( $self, $ev ) if $rc == IN_TURN;
    return _in_flight( $self, $self->_send_outcome( $ev, $rc, $what ) );
}

# SSE.pm's and WebSocket.pm's _send_outcome: their fast path sends one kind
# of message ($type: sse.send, websocket.send), which may have to wait for
# the buffer to drain or may have failed; anything it did not take is the
# class's _send_now.
sub _message_send_outcome {
    my ( $self, $ev, $rc, $what, $type ) = @_;
    if ( $rc == CLOSED_UNSEEN ) {
        $self->_sync;
        $rc = CLOSED;
    }
    return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc) if $rc >= 0;
    return Future->fail("$type: $what\n") if $rc == FAILED;
    return $self->_send_now($ev);
}

# send.c took the app's send at once, but the app has held the interpreter
# for a whole turn while others wait: its Future resolves on the loop's
# next turn, so that they get theirs first.
sub _yield_turn {
    my ($self) = @_;
    my $f = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
    $PAGI::RS::Bridge::LOOP->later(
        sub {
            PAGI::RS::_turn_resumed();
            my $ok = eval { $f->done unless $f->is_ready; 1 };
            my $err = $@;
            PAGI::RS::_turn_ended();
            die $err unless $ok;
        }
    );
    return _in_flight( $self, $f );
}

# A send that is still pending is in flight until it settles.  The app
# gets a copy that $f settles (as without_cancel would make, with one
# callback instead of three): cancelling the copy leaves $f, and so the
# order of sends, alone.
sub _in_flight {
    my ( $self, $f ) = @_;
    return $f if $f->is_ready;
    $self->[SEND_BUSY] = $f;
    # A drain wait needs no copy: its bytes are queued already, so no later
    # send can overtake them, whatever the app does with the Future
    # (Transport.pm's _send_waited frees the slot before resolving it).
    my $wait = $self->[SEND_WAIT];
    return $f if $wait && refaddr($wait) == refaddr($f);
    my $copy = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
    $f->on_ready( sub { _settled( $self, $f, $copy ) } );
    return $copy;
}

# The slot is cleared before whoever awaits the copy resumes.
sub _settled {
    my ( $self, $f, $copy ) = @_;
    _not_busy( $self, $f );
    return if $copy->is_ready;    # the app cancelled its copy
    if ( $f->is_cancelled ) { $copy->cancel }
    elsif ( $f->is_failed ) { $copy->fail( $f->failure ) }
    else                    { $copy->done( $f->result ) }
    return;
}

sub _not_busy {
    my ( $self, $f ) = @_;
    my $busy = $self->[SEND_BUSY];
    $self->[SEND_BUSY] = undef if $busy && refaddr($busy) == refaddr($f);
    return;
}

# Queue $ev behind the send in flight; it takes the Perl path when its turn
# comes (the class's _send_now), and its own Future is in flight until then.
# What waits is bounded: an app that fires sends without awaiting them
# would otherwise hold its whole output here.  Past the limit a send fails
# at once, with the advice to await each send.
sub _send_in_turn {
    my ( $self, $ev ) = @_;
    my $waiting = $self->[TURN_BYTES] // 0;
    if ( $waiting >= $PAGI::RS::Bridge::SEND_BACKLOG ) {
        my $type = ref $ev eq 'HASH' ? $ev->{type} // 'send' : 'send';
        return Future->fail( "$type: send queue full: $waiting bytes of sends are already waiting their turn, "
              . "over the limit of $PAGI::RS::Bridge::SEND_BACKLOG (16 x --write-high-watermark); await each send\n" );
    }
    my $size = _event_size($ev);
    $self->[TURN_BYTES] = $waiting + $size;
    my $before = $self->[SEND_BUSY];
    my $turn   = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
    $self->[SEND_BUSY] = $turn;
    $turn->on_ready( sub { _not_busy( $self, $turn ) } );
    $before->on_ready(
        sub {
            $self->[TURN_BYTES] -= $size;
            my $f = eval { $self->_send_now($ev) } // Future->fail( $@ || "send failed\n" );
            $f->on_ready($turn);
        }
    );
    return $turn->without_cancel;
}

# What a waiting send holds: its payload, and a fixed cost per event (so a
# flood of empty events is bounded too).
sub _event_size {
    my ($ev) = @_;
    my $size = $PAGI::RS::Bridge::QUEUED_MESSAGE_COST;
    return $size unless ref $ev eq 'HASH';
    for my $key (qw(body text bytes data comment)) {
        my $v = $ev->{$key};
        $size += length $v if defined $v && !ref $v;
    }
    return $size;
}

sub _send_now { return _send_slow(@_) }

sub _send_outcome {
    my ( $self, $ev, $rc, $what ) = @_;
    if ( $rc == CLOSED_UNSEEN ) {
        $self->_sync;
        $rc = CLOSED;
    }
    if ( $rc >= 0 ) {
        if ( $what == SENT_BODY_END ) {
            _response_complete($self) unless $rc == CLOSED || $self->[TRAILERS];
        }
        elsif ( $what == SENT_START || $what == SENT_START_TRAILERS ) {
            if ( $rc != CLOSED ) {
                $self->[STARTED]  = 1;
                $self->[TRAILERS] = $what == SENT_START_TRAILERS ? 1 : 0;
            }
            return $DONE;
        }
        return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc);
    }
    if ( $rc == FAILED ) {
        my $type = $ev->{type};
        return Future->fail("$type: $what\n");
    }
    return _send_slow( $self, $ev );
}

sub _send_slow {
    my ( $self, $ev ) = @_;
    my $id = $self->[ID];
    my $type = ref $ev eq 'HASH' ? $ev->{type} : undef;
    return Future->fail("send() needs an event hash reference with a 'type'\n")
      unless defined $type;

    if ( $type eq 'http.response.body' ) {
        return $self->_send_file($ev) if defined $ev->{file};
        return $self->_send_fh($ev)   if defined $ev->{fh};
        my $more = $ev->{more} ? 1 : 0;
        my ( $rc, $err ) = PAGI::RS::_body( $id, $ev->{body}, $more );
        return Future->fail("http.response.body: $err\n") if $rc < 0;
        _response_complete($self) unless $more || $rc == CLOSED || $self->[TRAILERS];
        return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc);
    }
    if ( $type eq 'http.response.start' ) {
        my ( $rc, $err ) = PAGI::RS::_start( $id, $ev->{status}, $ev->{headers}, $ev->{trailers} );
        return Future->fail("http.response.start: $err\n") if $rc < 0;
        if ( $rc != CLOSED ) {
            $self->[STARTED] = 1;
            $self->[TRAILERS] = $ev->{trailers} ? 1 : 0;
        }
        return $DONE;
    }
    if ( $type eq 'http.response.trailers' ) {
        my ( $rc, $err ) = PAGI::RS::_trailers( $id, $ev->{headers} );
        return Future->fail("http.response.trailers: $err\n") if $rc < 0;
        $self->_response_complete unless $rc == CLOSED;
        return $DONE;
    }
    if ( $type eq 'http.fullflush' ) {
        my ( $rc, $err ) = PAGI::RS::_fullflush($id);
        return Future->fail("http.fullflush: $err\n") if $rc < 0;
        return $rc == DEFERRED ? $self->_wait_deferred(0) : $DONE;
    }
    return Future->fail("Unrecognised event type '$type' for an http scope\n");
}

# The terminal response event was accepted: the scope ends cleanly here
# (whether or not the client reads what is queued, or the app read the
# request body), and anyone waiting hears it from the loop.
sub _response_complete {
    my ($self) = @_;
    $self->[COMPLETE] = 1;
    $self->_notify_later if $self->_terminal(1);
    # A receive parked before now learns the request is over, whether or not
    # the body had been read: none of it is reported after the end.
    my $wait = $self->[RECV_WAIT];
    if ( $wait && !$wait->is_ready ) {
        $self->[RECV_WAIT] = undef;
        $wait->done( { type => 'http.disconnect' } );
    }
    return;
}

sub _valid_count {
    my ( $ev, $key ) = @_;
    my $v = $ev->{$key};
    return 1 unless defined $v;
    return $v =~ /\A[0-9]+\z/;
}

sub _send_file {
    my ( $self, $ev ) = @_;
    for my $key (qw(offset length)) {
        return Future->fail("http.response.body: '$key' must be a non-negative integer\n")
          unless _valid_count( $ev, $key );
    }
    my ( $rc, $err ) = PAGI::RS::_file( $self->[ID], $ev->{file}, $ev->{offset} // -1, $ev->{length} // -1 );
    return Future->fail("http.response.body: $err\n") if $rc < 0;
    return $self->_wait_deferred(1) if $rc == DEFERRED;
    $self->_response_complete if $rc == SENT;
    return $DONE;
}

sub _send_fh {
    my ( $self, $ev ) = @_;
    my $fh = $ev->{fh};
    for my $key (qw(offset length)) {
        return Future->fail("http.response.body: '$key' must be a non-negative integer\n")
          unless _valid_count( $ev, $key );
    }
    my $fd = eval { fileno($fh) };
    if ( defined $fd && $fd >= 0 ) {
        # The core streams the descriptor.  A regular file is read by
        # position (pread), from `offset` or else from where Perl's buffered
        # view of the handle is, and the handle does not move.  Anything
        # else (a pipe, a socket, a device) is read where it is until EOF or
        # `length`, so it is consumed; what Perl had already buffered for it
        # goes first.
        my $offset = $ev->{offset};
        my $buffered;
        if ( -f $fh ) {
            if ( !defined $offset ) {
                my $pos = eval { tell($fh) };
                $offset = defined $pos && $pos >= 0 ? $pos : -1;
            }
        }
        else {
            return Future->fail( "http.response.body: 'offset' needs a regular file; "
                  . "this fh (a pipe, socket or device) is read from where it is\n" )
              if defined $offset;
            $offset   = -1;
            $buffered = PAGI::RS::_fh_buffered($fh);
        }
        my ( $rc, $err ) = PAGI::RS::_fd( $self->[ID], $fd, $offset, $ev->{length} // -1, $buffered );
        return Future->fail("http.response.body: $err\n") if $rc < 0;
        return $self->_wait_deferred(1) if $rc == DEFERRED;
        $self->_response_complete if $rc == SENT;
        return $DONE;
    }
    return $self->_send_perl_handle($ev);
}

# A handle with no file descriptor (an in-memory or tied handle): read it
# here and send it as ordinary body chunks.
sub _send_perl_handle {
    my ( $self, $ev ) = @_;
    my $fh = $ev->{fh};
    if ( defined $ev->{offset} ) {
        seek( $fh, $ev->{offset}, 0 )
          or return Future->fail("http.response.body: cannot seek fh: $!\n");
    }
    my $remaining = $ev->{length};
    my $id        = $self->[ID];
    my $loop;
    $loop = sub {
        while (1) {
            my $want = 65536;
            $want = $remaining if defined $remaining && $remaining < $want;
            my $buf = '';
            my $n = $want > 0 ? read( $fh, $buf, $want ) : 0;
            return Future->fail("http.response.body: cannot read fh: $!\n") unless defined $n;
            $remaining -= $n if defined $remaining;
            my $last = $n == 0 || ( defined $remaining && $remaining <= 0 );
            my ( $rc, $err ) = PAGI::RS::_body( $id, $buf, $last ? 0 : 1 );
            return Future->fail("http.response.body: $err\n") if $rc < 0;
            if ( $last || $rc == CLOSED ) {
                $self->_response_complete if $rc != CLOSED;
                return $DONE;
            }
            next if $rc == SENT;
            if ( $rc == REACHED_HIGH ) {
                $self->_fire_high if $self->[ON_HIGH];
                next;
            }
            return $self->_wait_drain($rc)->then($loop);
        }
    };
    my $f = $loop->();
    return $f->on_ready( sub { undef $loop } );
}

# REACHED_HIGH: the send found room and was taken, but filled the buffer
# (on_high_water fires; nothing waits).  HIGH_WATER and STILL_HIGH: it
# found the buffer full, and resolves once the buffer drains.
sub _wait_drain {
    my ( $self, $rc ) = @_;
    $self->_fire_high if $rc != STILL_HIGH && $self->[ON_HIGH];
    return $DONE if $rc == REACHED_HIGH || !$self->[CONNECTED];
    return $self->[SEND_WAIT] = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
}

sub _wait_deferred {
    my ( $self, $completes ) = @_;
    $self->[DEFER_COMPLETES] = $completes;
    return $self->[DEFER_WAIT] = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
}


sub _on_send_done {
    my ( $self, $err ) = @_;
    my $f = $self->[DEFER_WAIT] or return;
    $self->[DEFER_WAIT] = undef;
    return if $f->is_ready;
    if ( defined $err ) {
        $f->fail("http.response.body: $err\n");
    }
    else {
        $self->_response_complete if $self->[DEFER_COMPLETES] && $self->[CONNECTED];
        $f->done;
    }
    return;
}

# The core says the response reached the network whole: a clean end.
sub _on_delivered {
    my ($self) = @_;
    if ( !$self->[COMPLETE] ) {
        # Whole on the wire before the app's last event: a response with no
        # body there (HEAD, 204, 304) ends with its head.  A receive parked
        # for the disconnect learns of the end, as after that event.
        $self->[COMPLETE] = 1;
        my $wait = $self->[RECV_WAIT];
        if ( $wait && !$wait->is_ready ) {
            $self->[RECV_WAIT] = undef;
            $wait->done( $self->_end_event );
        }
    }
    $self->_notify if $self->_terminal(1);
    if ( $self->[APP_DONE] ) {
        # Everything reached the network: a send still waiting is done.
        $self->_settle_sends;
        $self->_forget;
    }
    return;
}

# The core says the connection is gone.  The scope may have ended cleanly
# before (its terminal event was out): the core knows, so ask it.  Either
# way nothing will drain now, so whatever the app waits on settles.
sub _on_network_gone {
    my ( $self, $reason, $detail ) = @_;
    $self->_sync if $self->[CONNECTED];
    $self->_terminal( 0, $reason, $detail );    # the core had forgotten it
    $self->_notify;
    $self->_settle(0);
    $self->_forget if $self->[APP_DONE];
    return;
}

# After the notifications: a pending receive gets the disconnect event; and
# after an abnormal end pending sends resolve (a disconnect never fails a
# send).  After a clean end they resolve as the buffer drains.
sub _settle {
    my ( $self, $clean ) = @_;
    $self->_settle_receive;
    return if $clean;
    $self->_settle_sends;
    return;
}

# A pending receive gets the end.  After an abnormal end, body chunks still
# on their way come first (the first of them settles it); after the
# response completed, none does.  WebSocket.pm has its own.
sub _settle_receive {
    my ($self) = @_;
    my $wait = $self->[RECV_WAIT];
    return unless $wait && !$wait->is_ready && ( $self->[COMPLETE] || !_body_on_its_way($self) );
    $self->[RECV_WAIT] = undef;
    $wait->done( $self->_end_event );
    return;
}

# The sends waiting for the drain or the flush resolve (never fail).
sub _settle_sends {
    my ($self) = @_;
    $self->_send_waited;
    if ( my $f = $self->[DEFER_WAIT] ) {
        $self->[DEFER_WAIT] = undef;
        $f->done unless $f->is_ready;
    }
    return;
}

sub _end_event { return { type => 'http.disconnect' } }

1;
