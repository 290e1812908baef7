package PAGI::RS::Bridge;

# The Perl half of the pagi-rs bridge: owns the interpreter's IO::Async
# loop, drains messages from the network core when its eventfd fires, and
# dispatches them to the per-request and lifespan objects.

use strict;
use warnings;
use File::Spec ();
use Scalar::Util ();

our $VERSION = '0.1.0';

# Message kinds (MSG_STREAM_REQUEST: an sse or websocket REQUEST, as request.c
# hands it over) and the levels of PAGI::RS::_log, shared with Rust and C
# through src/interp/constants.def.
use PAGI::RS::Constants qw(msg log);

our $LOOP;            # the interpreter's IO::Async loop (IO::Async::Loop->new returns it)
our $APP;             # the application coderef, set by PAGI::RS::Loader
our %STATE;           # lifespan state; each request scope gets a shallow copy
our %REQUESTS;        # id => PAGI::RS::HTTP, while events may still arrive for it
our ($HIGH_WATER, $LOW_WATER);
our ( $MAX_RECEIVE_QUEUE, $MAX_WS_FRAME_SIZE );    # WebSocket limits
our $MAX_UNREAD_BYTES;                             # bytes an app may leave unread (one message always fits)
our ( $SPEC_VERSION, $CORE_VERSION );              # --spec-version: "0.6" and "0.5", or "0.3" and "0.4"
our $CURRENT_SPEC;                                 # true unless --spec-version 0.3
our $MAX_DISCONNECT_RECEIVES;
# Bytes of sends waiting their turn (HTTP.pm) past which a send fails, and
# what each counts beyond its payload: the WebSocket writer's limit too.
our ( $SEND_BACKLOG, $QUEUED_MESSAGE_COST );
my $stopping;

# Debian package for each module the bridge cannot run without.
my @REQUIRED = (
    [ 'Future'             => 'libfuture-perl' ],
    [ 'Future::AsyncAwait' => 'libfuture-asyncawait-perl' ],
    [ 'IO::Async::Loop'    => 'libio-async-perl' ],
    [ 'Future::IO'         => 'libfuture-io-perl' ],
);

sub _require_dependencies {
    for my $dep (@REQUIRED) {
        my ( $module, $package ) = @$dep;
        ( my $file = "$module.pm" ) =~ s{::}{/}g;
        next if eval { require $file; 1 };
        my $err = $@;
        if ( $err =~ /^Can't locate \Q$file\E/ ) {
            die "the Perl module $module, which pagi-rs needs, is not installed.\n"
              . "Install it with: apt-get install $package\n";
        }
        die "pagi-rs could not load $module: $err";
    }
}

sub init {
    my ( $wake_fd, $high, $low, $max_queue, $max_frame, $max_unread_bytes, $spec, $core, $max_disconnect_receives,
        $send_backlog, $queued_message_cost, $loop_backend, @include )
      = @_;
    _require_dependencies();
    ( $HIGH_WATER, $LOW_WATER ) = ( $high, $low );
    ( $MAX_RECEIVE_QUEUE, $MAX_WS_FRAME_SIZE ) = ( $max_queue, $max_frame );
    $MAX_UNREAD_BYTES = $max_unread_bytes;
    ( $SPEC_VERSION, $CORE_VERSION ) = ( $spec, $core );
    $CURRENT_SPEC            = $spec ne '0.3';
    $MAX_DISCONNECT_RECEIVES = $max_disconnect_receives;
    ( $SEND_BACKLOG, $QUEUED_MESSAGE_COST ) = ( $send_backlog, $queued_message_cost );
    require IO::Async::Handle;
    $LOOP = _new_loop( $loop_backend, @include );
    require PAGI::RS::FutureIO;
    PAGI::RS::FutureIO->install($LOOP);
    require PAGI::RS::Pending;
    PAGI::RS::Pending->setup($LOOP);
    require PAGI::RS::HTTP;
    require PAGI::RS::SSE;
    require PAGI::RS::WebSocket;
    require PAGI::RS::Lifespan;
    require PAGI::RS::Loader;

    open my $wake, '<&=', $wake_fd or die "cannot open the wake-up fd $wake_fd: $!";
    $LOOP->watch_io( handle => $wake, on_read_ready => \&drain );
    return ref $LOOP;    # for the startup line
}

# The interpreter's loop, which `IO::Async::Loop->new` then returns to the
# app.  IO::Async's own choice on Linux is IO::Async::Loop::Epoll whenever
# that is installed, and two of its properties break this server:
#   - a worker forked by the master (-w N) inherits the master's epoll set,
#     and the Epoll loop's post_fork makes a new set without re-adding the
#     handles it watched (it keeps their registrations and only modifies
#     them), so the worker never hears its wake-up fd and serves nothing;
#   - a Linux::Epoll object is not clone-safe, so an app that starts an
#     ithread crashes the process.
# The Perl side watches one fd (the wake-up eventfd) besides the app's own,
# which is what the builtin poll(2) loop is good at, so that is the default.
# `-l BACKEND` names the class outright (and, unlike IO_ASYNC_LOOP, one
# that cannot be loaded stops the server rather than falling back);
# IO_ASYNC_LOOP, IO::Async's own setting, still chooses, and a loop made
# before this one (PERL5OPT, -M) stays the loop.
sub _new_loop {
    my ( $backend, @include ) = @_;
    no warnings 'once';
    return _named_loop( $backend, @include ) if length $backend;
    return IO::Async::Loop->new
      if defined $ENV{IO_ASYNC_LOOP} || defined $IO::Async::Loop::ONE_TRUE_LOOP;
    require IO::Async::Loop::Poll;
    return IO::Async::Loop::Poll->new;
}

# Debian packages of the loop classes IO::Async does not ship itself.
my %LOOP_PACKAGE = (
    Epoll => 'libio-async-loop-epoll-perl',
    Glib  => 'libio-async-loop-glib-perl',
    Mojo  => 'libio-async-loop-mojo-perl',
);

# The loop `-l` names; it becomes the one IO::Async::Loop->new returns to
# the app, as IO::Async's own choice would.  The name was checked to be a
# class name by the command line.  The `-I` directories, which the loader
# adds to @INC for the app later, are searched for it too.
sub _named_loop {
    my ( $backend, @include ) = @_;
    my $class = "IO::Async::Loop::$backend";
    ( my $file = "$class.pm" ) =~ s{::}{/}g;
    local @INC = ( ( map { File::Spec->rel2abs($_) } @include ), @INC );
    my $loop = eval { require $file; $class->new };
    if ( !$loop ) {
        my $err = $@ || "$class->new returned nothing\n";
        if ( $err =~ /^Can't locate \Q$file\E/ ) {
            $err = "$class is not installed\n";
            $err .= "Install it with: apt-get install $LOOP_PACKAGE{$backend}\n" if $LOOP_PACKAGE{$backend};
        }
        die "cannot use the event loop '$backend' (-l $backend): $err";
    }
    # The named loop wins over one made earlier (PERL5OPT): it is the one
    # the app's IO::Async::Loop->new must return.
    $IO::Async::Loop::ONE_TRUE_LOOP = $loop;
    return $loop;
}

# In a worker the master forked: the loop renews its kernel state.  The
# Epoll loop (chosen with IO_ASYNC_LOOP) keeps, through its post_fork, its
# record of what it had added to the master's epoll set, and so only
# modifies on the new set handles it never added there; forgetting that
# record makes it add each one.  (Poll keeps no kernel state.)
sub renew_loop_after_fork {
    if ( $LOOP->isa('IO::Async::Loop::Epoll') ) {
        $LOOP->{masks}              = {};
        $LOOP->{refaddr_for_fileno} = {};
    }
    $LOOP->post_fork;
    return 1;
}

# Leave only when the core says so: a die from an application's raw loop
# callback (a timer, a watch_io) escapes $LOOP->run, and must not end the
# interpreter.
sub run {
    drain();
    until ($stopping) {
        next if eval { $LOOP->run; 1 };
        my $err = $@;
        PAGI::RS::_log( LOG_ERROR, "Uncaught exception in an event loop callback (the server keeps running): $err" );
    }
    %REQUESTS = ();
    return '';
}

# IO::Async reports its loop's work to Metrics::Any when that is installed,
# through a collector in $IO::Async::Metrics::METRICS, a variable its
# modules share and test before each report (`$METRICS and ...`), twice
# per loop turn.  The collector's truth is an overloaded Perl sub (about
# 2,400 instructions a test, 5 % of a hello-world request on one
# connection).  It is false, for good, once the collector has settled on
# Metrics::Any's Null adapter (nobody configured one), which IO::Async's
# first report makes it do.  From then on the shared variable is undef, as
# it is when Metrics::Any is not installed: every use of it in IO::Async
# tests it, finds it false and reports nothing, as before.
my $metrics_settled;

# Keep taking batches until none arrives while the last was processed:
# under load this saves a trip through the event loop per batch.
sub drain {
    _settle_io_async_metrics() unless $metrics_settled;
    while ( PAGI::RS::_wake_ack() ) {
        _dispatch_inbox();
    }
    return;
}

# See above $metrics_settled.
sub _settle_io_async_metrics {
    my $collector = $IO::Async::Metrics::METRICS;
    if ( !Scalar::Util::blessed($collector) || !$collector->isa('Metrics::Any::Collector') ) {
        $metrics_settled = 1;
        return;
    }
    my $adapter = $collector->{adapter} or return;    # no report yet: ask again at the next wake-up
    $metrics_settled = 1;
    $IO::Async::Metrics::METRICS = undef if ref $adapter eq 'Metrics::Any::Adapter::Null';
    return;
}

# One eval around a whole batch rather than one per message (this runs for
# every request); after a die, the rest of the batch is taken in a new one.
sub _dispatch_inbox {
    until ( eval { _dispatch_messages(); 1 } ) {
        PAGI::RS::_log( LOG_ERROR, "pagi-rs bridge error: $@" );
    }
    return;
}

sub _dispatch_messages {
    # _next runs http requests' applications itself (http_app.c, with
    # HTTP.pm's help), and returns every other message:
    # STREAM_REQUEST: (kind, request, scope, send); others:
    # (kind, id, num0..num3, headers, strings...)
    while ( my @m = PAGI::RS::_next() ) {
        my $kind = $m[0];
        if ( $kind == MSG_STREAM_REQUEST ) {
            $m[1]->start( $m[2], $m[3] );
        }
        elsif ( $kind == MSG_WS_RECEIVE ) {
            my $r = $REQUESTS{ $m[1] };
            $r->_on_message( $m[2], $m[7] ) if $r;
        }
        elsif ( $kind == MSG_WS_DISCONNECT ) {
            # (code, clean, peer code or -1) and (reason, detail, peer reason)
            my $r = $REQUESTS{ $m[1] };
            $r->_on_closed( $m[2], $m[3], $m[7], $m[8], $m[4] >= 0 ? $m[4] : undef, $m[9] ) if $r;
        }
        elsif ( $kind == MSG_BODY ) {
            my $r = $REQUESTS{ $m[1] };
            $r->_on_body( $m[7], $m[2] ) if $r;
        }
        elsif ( $kind == MSG_DISCONNECT ) {
            my $r = $REQUESTS{ $m[1] };
            $r->_on_network_gone( $m[7], $m[8] ) if $r;
        }
        elsif ( $kind == MSG_DRAINED ) {
            my $r = $REQUESTS{ $m[1] };
            $r->_on_drained( $m[2] ) if $r;
        }
        elsif ( $kind == MSG_SEND_DONE ) {
            my $r = $REQUESTS{ $m[1] };
            $r->_on_send_done( $m[7] ) if $r;
        }
        elsif ( $kind == MSG_COMPLETE ) {
            my $r = $REQUESTS{ $m[1] };
            $r->_on_delivered if $r;
        }
        elsif ( $kind == MSG_LIFESPAN_STARTUP ) {
            PAGI::RS::Lifespan::startup( $m[2] );    # worker number, 0 for none
        }
        elsif ( $kind == MSG_LIFESPAN_SHUTDOWN ) {
            PAGI::RS::Lifespan::shutdown();
        }
        elsif ( $kind == MSG_STOP ) {
            $stopping = 1;
            $LOOP->stop;
        }
    }
    return;
}

1;
