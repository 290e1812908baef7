package PAGI::RS::WebSocket;

# A websocket scope (Spec/Www.pod, "WebSocket") on the Perl side: the
# scope's extra keys, $receive with its queue, and $send mapped onto the
# core's session (src/websocket/session.rs), which owns sequencing, the
# handshake and the socket.  The object is also the scope's pagi.connection
# and pagi.transport.
#
# Until websocket.accept the scope is an HTTP exchange: under Www 0.6 the
# app refuses the handshake with an ordinary http.response.* response, so
# this class is an HTTP request object underneath and shares its layout.

use strict;
use warnings;
use Future;
use bytes ();
use PAGI::RS::HTTP;

our @ISA = ('PAGI::RS::HTTP');

# HTTP.pm's slots and send codes, and this file's slots (after HTTP.pm's):
# PHASE, ENDED (the websocket.disconnect event, once known),
# CONNECT_DELIVERED, END_DELIVERED, QUEUE_BYTES (payload bytes of the
# messages in QUEUE) and DROPPING (a message went past the unread limits).
use PAGI::RS::Constants qw(slot send ws_slot query);

use constant { CONNECTING => 0, OPEN => 1, REFUSED => 2 };

my $DONE = $PAGI::RS::HTTP::DONE;

sub _fail { return Future->fail("$_[0]\n") }

# Values of every Sec-WebSocket-Protocol header, split on commas and trimmed.
sub _subprotocols {
    my ($headers) = @_;
    my @offered;
    for my $pair (@$headers) {
        next unless $pair->[0] eq 'sec-websocket-protocol';
        push @offered, grep { length } map { s/\A\s+|\s+\z//gr } split /,/, $pair->[1];
    }
    return \@offered;
}

# $send is send.c's XS sender: a plain websocket.send goes straight to the
# core, everything else to _after_send.
sub start {
    my ( $self, $scope, $send ) = @_;
    $self->[PHASE] = CONNECTING;
    delete $scope->{method};
    $scope->{subprotocols}      = _subprotocols( $scope->{headers} );
    $scope->{max_receive_queue} = $PAGI::RS::Bridge::MAX_RECEIVE_QUEUE;
    $scope->{max_frame_size}    = $PAGI::RS::Bridge::MAX_WS_FRAME_SIZE
      if $PAGI::RS::Bridge::MAX_WS_FRAME_SIZE;
    # $receive is websocket.c's XS receiver; what it does not handle goes
    # to _receive.
    PAGI::RS::HTTP::run_app( $self, $scope, $send, PAGI::RS::_ws_receiver($self) );
    return;
}

# The Perl half of $send is HTTP.pm's _after_send; fast_send.c's fast path took
# only a plain websocket.send, whose outcome is this.
sub _send_outcome { return PAGI::RS::HTTP::_message_send_outcome( @_, 'websocket.send' ) }

sub _send_now { return _send(@_) }

sub _app_done {
    my ( $self, $err ) = @_;
    return if $self->[APP_DONE]++;
    PAGI::RS::_ws_finish( $self->[ID], $err );
    # The core ends an accepted socket the app left without closing (1011),
    # and answers an undecided handshake (500; 0.3: 403): read the outcome.
    $self->_sync if $self->[CONNECTED];
    # Events still come for an open socket until it ends, and for a refusal
    # until its response is out if someone waits to hear how it ended.
    $self->_forget
      if !$self->[CONNECTED]
      || ( $self->[PHASE] != OPEN && !PAGI::RS::Connection::_has_callbacks($self) );
    return;
}

# ---- $receive -------------------------------------------------------------
# websocket.c does what _receive and _on_message do for an open socket's
# messages (a queued message, a receive that waits); these take the rest.

sub _receive {
    my ($self) = @_;
    return Future->done( { type => 'websocket.connect' } ) unless $self->[CONNECT_DELIVERED]++;
    my $q = $self->[QUEUE];
    if ( $q && @$q ) {
        my $ev = shift @$q;
        $self->[QUEUE_BYTES] -= bytes::length( $ev->{text} // $ev->{bytes} // "" );
        return Future->done($ev);
    }
    # Once the end is known here (read from the core, say by a send that
    # found the socket closed), messages the peer sent before it may still be
    # on their way to this interpreter: they come first, so this receive
    # waits for them as it would on an open socket (_on_message hands it the
    # next one, _on_closed the end after the last).
    if ( !$self->[CONNECTED] && !_messages_on_their_way($self) ) {
        # The end is told once; later receives get copies, up to a bound.
        if ( $self->[END_DELIVERED]++ ) {
            my $refused = PAGI::RS::HTTP::_past_disconnect_receives( $self, 'websocket' );
            return $refused if $refused;
        }
        return Future->done( $self->_end_event );
    }
    my $wait = $self->[RECV_WAIT];
    # One made while another waits gets the message after that one's.
    return PAGI::RS::Pending::after( $wait, sub { _receive($self) } ) if $wait && !$wait->is_ready;
    return $self->[RECV_WAIT] = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
}

# Messages the core's reader took from the socket and posted to this
# interpreter that it has not dispatched yet (src/websocket/session.rs
# messages_in_transit).  The socket's end is posted after them.
sub _messages_on_their_way {
    my ($self) = @_;
    return ( PAGI::RS::_query( $self->[ID], Q_WS_MESSAGES_PENDING ) // 0 ) > 0;
}

# The event a receive gets once the scope ended: websocket.disconnect,
# except after a refusal that completed (an HTTP exchange that ended
# cleanly delivers none; a receive hears http.disconnect).
sub _end_event {
    my ($self) = @_;
    return { type => 'http.disconnect' } if $self->[COMPLETED_CLEANLY] && $self->[PHASE] != OPEN;
    my $end = $self->[ENDED] //= {
        type   => 'websocket.disconnect',
        code   => 1006,
        reason => $self->[REASON] // '',
    };
    return {%$end};
}

# A message from the peer.  Past --max-receive-queue unread messages, or
# past $MAX_UNREAD_BYTES of them (one message always fits), the core closes
# the socket with 1008 (queue_overflow); this one is dropped, and so is
# every later one, so that the app is given a beginning of what the peer
# sent.  Unless the peer has sent its last message already (the core says
# so: see Session::overflow): then the few still on their way are kept.
sub _on_message {
    my ( $self, $is_text, $data ) = @_;
    return if $self->[DROPPING];
    my $ev = $is_text
      ? { type => 'websocket.receive', text  => $data }
      : { type => 'websocket.receive', bytes => $data };
    my $wait = $self->[RECV_WAIT];
    if ( $wait && !$wait->is_ready ) {
        $self->[RECV_WAIT] = undef;
        $wait->done($ev);
        return;
    }
    my $q = $self->[QUEUE] //= [];
    # Bytes as received (a text string's internal UTF-8), in constant time.
    my $len = bytes::length($data);
    my @limit =
        @$q >= $PAGI::RS::Bridge::MAX_RECEIVE_QUEUE ? ( $PAGI::RS::Bridge::MAX_RECEIVE_QUEUE, 0 )
      : @$q && $self->[QUEUE_BYTES] + $len > $PAGI::RS::Bridge::MAX_UNREAD_BYTES
      ? ( $PAGI::RS::Bridge::MAX_UNREAD_BYTES, 1 )
      : ();
    if ( @limit && PAGI::RS::_ws_overflow( $self->[ID], @limit ) ) {
        $self->[DROPPING] = 1;
        return;
    }
    push @$q, $ev;
    $self->[QUEUE_BYTES] += $len;
    return;
}

# The socket ended and its transport closed (core: session.end).  A
# completed closing handshake is a clean end; the event carries the peer's
# code and reason then, and the standard token otherwise.
sub _on_closed {
    my ( $self, $code, $clean, $reason, $detail, $peer_code, $peer_reason ) = @_;
    $self->[ENDED] //= { type => 'websocket.disconnect', code => $code + 0, reason => $reason // '' };
    $self->_notify if $self->_terminal( $clean, $reason, $detail, $peer_code, $peer_reason );
    # Every message the peer sent came before this one: a receive that the
    # notifications left waiting for them (_settle_receive) has the end now.
    $self->_settle_receive if ( $self->[NOTIFIED] // 0 ) == 2;
    $self->_forget if $self->[APP_DONE];
    return;
}

# Before accept the core reports the handshake's exchange like any http
# request's (HTTP.pm's _on_network_gone, _on_delivered, _on_send_done): the
# client leaving during the handshake, a refusal completing (a clean end,
# with no websocket.disconnect) or being cut short.

# The pending receive first: resolving the send resumes the app at once,
# and an app that sends in a loop until its receive is ready would spin.
sub _settle {
    my ($self) = @_;
    $self->_settle_receive;
    $self->_send_waited;
    $self->SUPER::_settle;
    return;
}

# A pending receive gets the end, unless messages the peer sent before it
# are still on their way: the first of them settles it, and _on_closed,
# after the last, settles the receive that waits then.
sub _settle_receive {
    my ($self) = @_;
    my $wait = $self->[RECV_WAIT];
    return unless $wait && !$wait->is_ready;
    return if _messages_on_their_way($self);
    $self->[RECV_WAIT] = undef;
    $self->[END_DELIVERED] = 1 unless $self->[COMPLETED_CLEANLY] && $self->[PHASE] != OPEN;
    $wait->done( $self->_end_event );
    return;
}

# The facts of the end also make the websocket.disconnect event, when they
# are known before its message (read from the core, or an abort): a
# completed handshake carries the peer's code and reason text, an abnormal
# end its code (1006 unless the server sent another) and reason token.  An
# abnormal end without a peer Close reports close_code 1006.
sub _terminal {
    my ( $self, $clean, $reason, $detail, $close_code, $close_reason, $event_code ) = @_;
    return 0 unless $self->SUPER::_terminal( $clean, $reason, $detail, $close_code, $close_reason );
    $self->[CLOSE_CODE] //= 1006 unless $clean;
    if ( $self->[PHASE] == OPEN ) {
        $self->[ENDED] //= $clean
          ? { type => 'websocket.disconnect', code => $close_code // 1005, reason => $close_reason // '' }
          : { type => 'websocket.disconnect', code => $event_code // 1006, reason => $reason // '' };
    }
    return 1;
}

# As HTTP.pm's: REACHED_HIGH was taken and waits for nothing.
sub _wait_drain {
    my ( $self, $rc ) = @_;
    $self->_fire_high if $rc != STILL_HIGH && $self->[ON_HIGH];
    return $DONE if $rc == REACHED_HIGH || !$self->[CONNECTED];
    my $wait = $self->[SEND_WAIT];
    return $wait if $wait && !$wait->is_ready;
    return $self->[SEND_WAIT] = PAGI::RS::Pending->new($PAGI::RS::Bridge::LOOP);
}

# ---- $send ----------------------------------------------------------------

sub _non_negative_number {
    my ($v) = @_;
    return defined $v && !ref $v && $v =~ /\A(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\z/;
}

sub _ms { my ($s) = @_; return $s > 0 ? int( $s * 1000 + 0.5 ) || 1 : 0 }

sub _send {
    my ( $self, $ev ) = @_;
    my $type = ref $ev eq 'HASH' ? $ev->{type} : undef;
    return _fail("send() needs an event hash reference with a 'type'") unless defined $type;
    my $id = $self->[ID];
    my ( $rc, $err );

    if ( $type eq 'websocket.send' ) {
        my ( $text, $bytes ) = @{$ev}{qw(text bytes)};
        my $n = ( defined $text ? 1 : 0 ) + ( defined $bytes ? 1 : 0 );
        return _fail("websocket.send requires exactly one of bytes/text (got $n)") if $n != 1;
        ( $rc, $err ) = defined $text ? PAGI::RS::_ws_send( $id, 1, $text ) : PAGI::RS::_ws_send( $id, 0, $bytes );
        return _fail("websocket.send: $err") if $rc < 0;
        return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc);
    }
    if ( $type eq 'websocket.accept' ) {
        return _fail("websocket.accept after refusing the handshake with an HTTP response")
          if $self->[PHASE] == REFUSED;
        return _fail("websocket.accept 'subprotocol' must be a string") if ref $ev->{subprotocol};
        ( $rc, $err ) = PAGI::RS::_ws_accept( $id, $ev->{subprotocol}, $ev->{headers} );
        return _fail("websocket.accept: $err") if $rc < 0;
        if ( $rc != CLOSED ) {
            $self->[PHASE]   = OPEN;
            $self->[STARTED] = 1;
        }
        return $DONE;
    }
    if ( $type eq 'websocket.close' ) {
        my $code = $ev->{code} // 1000;
        return _fail("websocket.close 'code' must be a non-negative integer")
          if ref $code || $code !~ /\A[0-9]+\z/;
        return _fail("websocket.close 'reason' must be a string") if ref $ev->{reason};
        ( $rc, $err ) = PAGI::RS::_ws_close( $id, $code, $ev->{reason} // '' );
        return _fail("websocket.close: $err") if $rc < 0;
        # Www 0.3: a close before accept refused the handshake with 403.
        if ( $self->[PHASE] == CONNECTING ) {
            $self->[PHASE]   = REFUSED;
            $self->[STARTED] = 1;
        }
        return $DONE;
    }
    if ( $type eq 'websocket.keepalive' ) {
        my ( $interval, $timeout ) = @{$ev}{qw(interval timeout)};
        return _fail("websocket.keepalive requires 'interval' field") unless defined $interval;
        return _fail("websocket.keepalive 'interval' must be a non-negative number")
          unless _non_negative_number($interval);
        return _fail("websocket.keepalive 'timeout' must be a non-negative number")
          if defined $timeout && !_non_negative_number($timeout);
        ( $rc, $err ) = PAGI::RS::_ws_keepalive( $id, _ms($interval), _ms( $timeout // 0 ) );
        return _fail("websocket.keepalive: $err") if $rc < 0;
        return $DONE;
    }
    if ( $PAGI::RS::Bridge::CURRENT_SPEC && $type =~ /\Ahttp\.response\.(?:start|body|trailers)\z/ ) {
        return $self->_refuse($ev);
    }
    if ( !$PAGI::RS::Bridge::CURRENT_SPEC
        && ( $type eq 'websocket.http.response.start' || $type eq 'websocket.http.response.body' ) )
    {
        return $self->_legacy_denial($ev);
    }
    return _fail("Unrecognized event type '$type' for websocket protocol");
}

# Www 0.6: until websocket.accept the scope is an HTTP exchange, and an
# ordinary response refuses the handshake.  It needs a status of 300 or
# more (a 2xx would claim the upgrade happened); the connection closes
# after it.  After accept these events fail and send nothing.
sub _refuse {
    my ( $self, $ev ) = @_;
    my $type = $ev->{type};
    return _fail("cannot send '$type' after websocket.accept") if $self->[PHASE] == OPEN;
    if ( $type eq 'http.response.start' && $self->[PHASE] == CONNECTING ) {
        my $status = $ev->{status};
        return _fail("http.response.start refusing a WebSocket handshake needs a status of 300 or more")
          if defined $status && !ref $status && $status =~ /\A[0-9]+\z/ && $status < 300;
    }
    my $f = PAGI::RS::HTTP::_send_slow( $self, $ev );
    $self->[PHASE] = REFUSED if $type eq 'http.response.start' && !$f->is_failed;
    return $f;
}

# Www 0.3's denial extension (websocket.http.response.start/.body); after
# accept it no longer applies and its events are ignored.
sub _legacy_denial {
    my ( $self, $ev ) = @_;
    my $type = $ev->{type};
    return $DONE if $self->[PHASE] == OPEN;
    my ( $rc, $err );
    if ( $type eq 'websocket.http.response.start' ) {
        ( $rc, $err ) = PAGI::RS::_start( $self->[ID], $ev->{status}, $ev->{headers}, 0 );
        return _fail("$type: $err") if $rc < 0;
        $self->[PHASE]   = REFUSED;
        $self->[STARTED] = 1;
        return $DONE;
    }
    my $more = $ev->{more} ? 1 : 0;
    ( $rc, $err ) = PAGI::RS::_body( $self->[ID], $ev->{body}, $more );
    return _fail("$type: $err") if $rc < 0;
    $self->[COMPLETE] = 1 unless $more;
    return $DONE;
}

1;
