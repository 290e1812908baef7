package PAGI::RS::FutureIO;

# Wires Future::IO to the interpreter's IO::Async loop before any app code
# runs, so `await Future::IO->sleep(1)` works without the app doing anything.
# waitpid is replaced with a pidfd-based watch: IO::Async's own reaps with
# waitpid(-1), which would steal children of other interpreters (and of the
# network core) living in the same process.

use strict;
use warnings;
use POSIX ();

use constant SYS_pidfd_open => 434;

my $LOOP;

sub install {
    my ( $class, $loop ) = @_;
    $LOOP = $loop;
    require Future::IO;
    require Future::IO::Impl::IOAsync;    # becomes the implementation on load
    no warnings 'redefine';
    *Future::IO::Impl::IOAsync::waitpid = \&_waitpid;
    return;
}

sub _waitpid {
    my ( undef, $pid ) = @_;
    my $f     = $LOOP->new_future;
    my $pidfd = syscall( SYS_pidfd_open, $pid, 0 );
    if ( $pidfd < 0 ) {
        # Already reaped or not our child: report what waitpid says.
        my $r = CORE::waitpid( $pid, POSIX::WNOHANG() );
        return $r == $pid ? $f->done($?) : $f->fail("waitpid($pid): $!\n");
    }
    open my $fh, '<&=', $pidfd or return $f->fail("pidfd for $pid: $!\n");
    my $stop = sub { $LOOP->unwatch_io( handle => $fh, on_read_ready => 1 ); close $fh };
    $LOOP->watch_io(
        handle        => $fh,
        on_read_ready => sub {
            my $r = CORE::waitpid( $pid, POSIX::WNOHANG() );
            return if $r == 0;
            my $status = $?;
            $stop->();
            $r == $pid ? $f->done($status) : $f->fail("waitpid($pid): $!\n");
        },
    );
    $f->on_cancel($stop);
    return $f;
}

1;
