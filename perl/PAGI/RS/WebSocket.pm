package PAGI::RS::WebSocket;

# A websocket scope (Spec/Www.pod, "WebSocket") on the Perl side: the
# scope's extra keys, $receive with its queue, and $send mapped onto the
# core's session (src/websocket/session.rs), which owns sequencing, the
# handshake and the socket.  The object is also the scope's pagi.connection
# and pagi.transport.

use strict;
use warnings;
use Future;
use PAGI::RS::Connection;
use PAGI::RS::Transport;
use PAGI::RS::HTTP ();

our @ISA = ( 'PAGI::RS::Connection', 'PAGI::RS::Transport' );

BEGIN {
    *ID        = \&PAGI::RS::Connection::ID;
    *CONNECTED = \&PAGI::RS::Connection::CONNECTED;
    *STARTED   = \&PAGI::RS::Connection::STARTED;
    *COMPLETE  = \&PAGI::RS::Connection::COMPLETE;
}

# Slots 0-10 belong to Connection.pm and Transport.pm.
use constant {
    QUEUE               => 11,    # received messages the app has not taken
    RECV_WAIT           => 12,
    SEND_WAIT           => 13,
    PHASE               => 14,
    ENDED               => 15,    # the websocket.disconnect event, once known
    APP_FUTURE          => 16,
    APP_DONE            => 17,
    DISCONNECT_RECEIVES => 18,
    CONNECT_DELIVERED   => 19,
    END_DELIVERED       => 20,
};

use constant { CONNECTING => 0, OPEN => 1, REFUSED => 2 };

# Send outcome codes from the core (SendOutcome in exchange.rs).
use constant { SENT => 0, HIGH_WATER => 1, STILL_HIGH => 2, CLOSED => 3 };

use constant MAX_DISCONNECT_RECEIVES => 100;

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

# $send is glue.c's XS sender: a plain websocket.send goes straight to the
# core, everything else to _after_send.
sub start {
    my ( $self, $scope, $send ) = @_;
    $self->[PHASE] = CONNECTING;
    delete $scope->{method};
    $scope->{subprotocols}      = _subprotocols( $scope->{headers} );
    $scope->{max_receive_queue} = $PAGI::RS::Bridge::MAX_RECEIVE_QUEUE;
    $scope->{max_frame_size}    = $PAGI::RS::Bridge::MAX_WS_FRAME_SIZE
      if $PAGI::RS::Bridge::MAX_WS_FRAME_SIZE;
    PAGI::RS::HTTP::run_app( $self, $scope, $send, sub { _receive($self) } );
    return;
}

# The Perl half of $send (see glue.c's xs_sender): a fast-path
# websocket.send that must wait ($rc >= 0), failed (-1, $what the
# message) or was not taken (-2).
sub _after_send {
    my ( $self, $ev, $rc, $what ) = @_;
    return $rc == SENT || $rc == CLOSED ? $DONE : $self->_wait_drain($rc) if $rc >= 0;
    return _fail("websocket.send: $what") if $rc == -1;
    return _send( $self, $ev );
}

sub _app_done {
    my ( $self, $err ) = @_;
    return if $self->[APP_DONE]++;
    PAGI::RS::_ws_finish( $self->[ID], $err );
    # Events still come for an open socket until it ends.
    $self->_forget if $self->[ENDED] || $self->[PHASE] != OPEN;
    return;
}


# ---- $receive -------------------------------------------------------------

sub _receive {
    my ($self) = @_;
    return Future->done( { type => 'websocket.connect' } ) unless $self->[CONNECT_DELIVERED]++;
    my $q = $self->[QUEUE];
    return Future->done( shift @$q ) if $q && @$q;
    if ( my $end = $self->[ENDED] ) {
        # The end is told once; later receives get copies, up to a bound, so
        # that an app that never checks for it does not spin forever.
        if ( $self->[END_DELIVERED]++ && ++$self->[DISCONNECT_RECEIVES] > MAX_DISCONNECT_RECEIVES ) {
            my $n = $self->[DISCONNECT_RECEIVES];
            PAGI::RS::_log( 3, "websocket scope on HTTP/1.1: receive() called $n times after the scope ended" )
              if $n == MAX_DISCONNECT_RECEIVES + 1;
            return _fail( "receive() called $n times after the scope ended; "
                  . "the application is not checking for websocket.disconnect" );
        }
        return Future->done( {%$end} );
    }
    my $wait = $self->[RECV_WAIT];
    return $wait if $wait && !$wait->is_ready;
    return $self->[RECV_WAIT] = $PAGI::RS::Bridge::LOOP->new_future;
}

# A message from the peer.  Past --max-receive-queue unread messages the
# core closes the socket with 1008 (queue_overflow); this one is dropped.
sub _on_message {
    my ( $self, $is_text, $data ) = @_;
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
    if ( @$q >= $PAGI::RS::Bridge::MAX_RECEIVE_QUEUE ) {
        PAGI::RS::_ws_overflow( $self->[ID] );
        return;
    }
    push @$q, $ev;
    return;
}

# The socket ended (core: session.end).  A completed closing handshake is a
# clean completion for pagi.connection; anything else a disconnect.
sub _on_closed {
    my ( $self, $code, $reason, $clean ) = @_;
    return if $self->[ENDED];
    my $end = { type => 'websocket.disconnect', code => $code + 0, reason => $reason // '' };
    $self->[ENDED] = $end;
    if ($clean) {
        $self->_mark_complete;
    }
    else {
        $self->_mark_disconnected($reason);
    }
    $self->[CONNECTED] = 0;
    # The pending receive first: resolving the send resumes the app at once,
    # and an app that sends in a loop until its receive is ready would spin.
    my $wait = $self->[RECV_WAIT];
    if ( $wait && !$wait->is_ready ) {
        $self->[RECV_WAIT] = undef;
        $self->[END_DELIVERED] = 1;
        $wait->done( {%$end} );
    }
    if ( my $f = $self->[SEND_WAIT] ) {
        $self->[SEND_WAIT] = undef;
        $f->done unless $f->is_ready;
    }
    $self->_forget if $self->[APP_DONE];
    return;
}

# The client left during the handshake (before any accept).
sub _on_network_gone {
    my ( $self, $reason ) = @_;
    $self->_on_closed( 1006, $reason, 0 );
    return;
}


# Not sent for websockets; present so a stray message is harmless.
sub _on_delivered { return }
sub _on_send_done { return }

sub _wait_drain {
    my ( $self, $rc ) = @_;
    $self->_fire_high if $rc == HIGH_WATER;
    return $DONE if $self->[ENDED];
    my $wait = $self->[SEND_WAIT];
    return $wait if $wait && !$wait->is_ready;
    return $self->[SEND_WAIT] = $PAGI::RS::Bridge::LOOP->new_future;
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
        $self->[PHASE] = REFUSED if $self->[PHASE] == CONNECTING;
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
    if ( $type eq 'websocket.http.response.start' || $type eq 'websocket.http.response.body' ) {
        # After accept the denial extension no longer applies: ignored.
        return $DONE if $self->[PHASE] == OPEN;
        if ( $type eq 'websocket.http.response.start' ) {
            ( $rc, $err ) = PAGI::RS::_start( $id, $ev->{status}, $ev->{headers}, 0 );
            return _fail("$type: $err") if $rc < 0;
            $self->[PHASE]   = REFUSED;
            $self->[STARTED] = 1;
            return $DONE;
        }
        my $more = $ev->{more} ? 1 : 0;
        ( $rc, $err ) = PAGI::RS::_body( $id, $ev->{body}, $more );
        return _fail("$type: $err") if $rc < 0;
        $self->[COMPLETE] = 1 unless $more;
        return $DONE;
    }
    return _fail("Unrecognized event type '$type' for websocket protocol");
}

1;
