use strict;
use warnings;
use Test::More;
use FindBin;
use lib "$FindBin::Bin/lib";
use PagiRS::Test;
use Config;
use File::Copy qw(copy);
use File::Find qw(find);
use File::Path qw(make_path);
use File::Spec;
use File::Temp qw(tempdir);

# `perl Makefile.PL && make && make install` puts pagi-rs where MakeMaker
# puts scripts, honouring INSTALL_BASE, PREFIX and DESTDIR, with a packlist
# naming it, and `make uninstall` removes it (README "Install").  And the
# Debian packages come in two sets: Makefile.PL asks only for the run-time
# ones, `make test-deps` (which `make test` runs) for the test-only ones.
#
# Each case runs the real Makefile.PL in a scratch copy of the distribution
# whose target/release/pagi-rs is the binary under test; $CARGO names a
# stand-in for cargo that only records what it was asked to do, so nothing
# is rebuilt.  dpkg-query and apt-get are stand-ins on PATH that record what
# they were asked for.

my $ROOT = File::Spec->rel2abs("$FindBin::Bin/..");
my $BIN  = pagi_bin();
-x $BIN or BAIL_OUT("no binary at $BIN: build it first (cargo build --release)");
my $tmp = tempdir( CLEANUP => 1 );

# A scratch distribution: what Makefile.PL reads, and the built binary.
my $n = 0;
sub scratch {
    my $dir = "$tmp/dist" . ++$n;
    make_path("$dir/target/release", "$dir/inc/PagiRS");
    copy( "$ROOT/$_", "$dir/$_" ) or die "copy $_: $!" for qw(Makefile.PL Cargo.toml inc/PagiRS/Deps.pm);
    symlink( $BIN, "$dir/target/release/pagi-rs" ) or die "symlink: $!";
    return $dir;
}

# Run @cmd in $dir; (exit code, stdout and stderr).
sub run_in {
    my ( $dir, @cmd ) = @_;
    my $pid = open( my $out, '-|' ) // die "fork: $!";
    if ( !$pid ) {
        chdir $dir or POSIX::_exit(126);
        open STDERR, '>&', \*STDOUT;
        exec @cmd or POSIX::_exit(127);
    }
    local $/;
    my $text = <$out> // '';
    close $out;
    return ( $? >> 8, $text );
}

# Nothing from the environment may redirect the install or the build.
delete @ENV{qw(PERL_MM_OPT PERL_MB_OPT DESTDIR INSTALL_BASE PREFIX MAKEFLAGS MFLAGS MAKELEVEL)};

my $fake = "$tmp/fakebin";
make_path($fake);
sub write_script {
    my ( $name, $body ) = @_;
    open my $fh, '>', "$fake/$name" or die "$name: $!";
    print $fh "#!/bin/sh\n$body";
    close $fh;
    chmod 0755, "$fake/$name" or die "chmod $name: $!";
}
my $cargo_log = "$tmp/cargo.log";
write_script( cargo => qq{echo "\$*" >> '$cargo_log'\n} );
local $ENV{CARGO} = "$fake/cargo";
sub cargo_calls { my @l = -f $cargo_log ? lines_of_raw($cargo_log) : (); unlink $cargo_log; join "\n", @l }
sub lines_of_raw { my ($f) = @_; open my $h, '<', $f or return (); map { chomp; $_ } <$h> }

# Packlists (auto/PAGI/RS/.packlist) under $root.
sub packlists {
    my ($root) = @_;
    my @found;
    find( sub { push @found, $File::Find::name if $_ eq '.packlist' && $File::Find::dir =~ m{/auto/PAGI/RS\z} }, $root )
      if -d $root;
    return @found;
}

sub lines_of { my ($f) = @_; open my $fh, '<', $f or return (); map { chomp; s/\s.*//r } <$fh> }

# Install with @makepl_args to Makefile.PL and @make_args to make; the
# binary must land at $want, be listed by the one packlist under $root,
# and go away again with `make uninstall @make_args`.
sub install_case {
    my ( $name, $makepl_args, $make_args, $root, $want ) = @_;
    subtest $name => sub {
        my $dir = scratch();
        my ( $code, $out ) = run_in( $dir, $^X, 'Makefile.PL', @$makepl_args );
        is $code, 0, 'perl Makefile.PL' or return diag $out;
        cargo_calls();
        ( $code, $out ) = run_in( $dir, 'make' );
        is $code, 0, 'make' or return diag $out;
        is cargo_calls(), 'build --release --bins', 'make builds with cargo';
        ( $code, $out ) = run_in( $dir, 'make', 'install', @$make_args );
        is $code, 0, 'make install' or return diag $out;
        ok -f $want && -x _, "the binary is at $want";
        is -s $want, -s $BIN, '...whole';
        my ( $vcode, $version ) = run_in( $dir, $want, '--version' );
        like $version, qr/^pagi-rs \d/, '...and runs';
        my @lists = packlists($root);
        is scalar @lists, 1, 'one packlist' or return diag "packlists: @lists";
        my @entries = lines_of( $lists[0] );
        ok( ( grep { $_ eq $want } @entries ), 'the packlist lists the binary' ) or diag "entries: @entries";
        # Never let an uninstall reach outside the scratch directory.
        my @outside = grep { index( $_, "$tmp/" ) != 0 } @entries;
        is_deeply \@outside, [], 'every entry is under the install root' or return;
        ( $code, $out ) = run_in( $dir, 'make', 'uninstall', @$make_args );
        is $code, 0, 'make uninstall' or diag $out;
        like $out, qr/^unlink \Q$want\E$/m, 'says what it removed';
        ok !-e $want, 'the binary is gone';
        ok !-e $lists[0], 'so is the packlist';
    };
}

install_case( 'INSTALL_BASE', ["INSTALL_BASE=$tmp/base"], [], "$tmp/base", "$tmp/base/bin/pagi-rs" );

{
    # PREFIX replaces the site prefix in the site script directory
    # (/usr/local/bin on Debian: PREFIX/bin).
    my $script = $Config{installsitescript};
    $script =~ s/^\Q$Config{siteprefixexp}\E/$tmp\/prefix/ or die "installsitescript $script is not under siteprefix";
    install_case( 'PREFIX', ["PREFIX=$tmp/prefix"], [], "$tmp/prefix", "$script/pagi-rs" );
}

install_case( 'DESTDIR (the default location, staged)', [], ["DESTDIR=$tmp/dest"], "$tmp/dest",
    "$tmp/dest$Config{installsitescript}/pagi-rs" );

subtest 'a private install does not adopt a system-wide packlist' => sub {
    my $dir = scratch();
    run_in( $dir, $^X, 'Makefile.PL', "INSTALL_BASE=$tmp/private" );
    my ( $code, $text ) = run_in( $dir, 'make', '-n', 'install' );
    like $text, qr{read "?\Q$tmp/private/\E[^"\s]*/auto/PAGI/RS/\.packlist}, 'install merges with the packlist at its own destination';
    unlike $text, qr{read "?\Q$Config{installsitearch}\E}, 'not with the system one';
};

subtest 'a changed Makefile.PL does not throw away the compiled crates' => sub {
    my $dir = scratch();
    run_in( $dir, $^X, 'Makefile.PL' );
    my $past = time - 60;                          # as after a pull that changed Makefile.PL
    utime $past, $past, "$dir/Makefile" or die "utime: $!";
    cargo_calls();
    my ( $code, $out ) = run_in( $dir, 'make' );
    like $out, qr/Makefile out-of-date/, 'MakeMaker rebuilds the Makefile (and runs make clean)';
    unlike cargo_calls(), qr/^clean/m, 'without cargo clean';
    run_in( $dir, 'make' );
    cargo_calls();
    ( $code, $out ) = run_in( $dir, 'make', 'realclean' );
    like cargo_calls(), qr/^clean$/m, 'make realclean runs cargo clean' or diag $out;
};

# --- which packages are asked for when ---------------------------------------

# Stand-ins: dpkg-query answers from $state (one installed package a line),
# apt-get install adds to it and logs its arguments.
my $state = "$tmp/installed";
my $log   = "$tmp/apt.log";
write_script( 'dpkg-query' => <<"SH" );
for last; do :; done
grep -qx "\$last" '$state' && printf 'install ok installed'
exit 0
SH
write_script( 'apt-get' => <<"SH" );
echo "\$*" >> '$log'
[ "\$1" = install ] || exit 0
shift; shift
for p; do echo "\$p" >> '$state'; done
SH
local $ENV{PATH} = "$fake:$ENV{PATH}";

my @RUN  = qw(libperl-dev gcc make libfuture-perl libfuture-asyncawait-perl libio-async-perl libfuture-io-perl);
my @TEST = qw(chromium chromium-driver wrk nghttp2-client nginx-light python3-h2 openssl curl);

sub reset_state { my @have = @_; open my $s, '>', $state or die; print $s map {"$_\n"} @have; close $s; unlink $log }
sub asked_for { my @l = -f $log ? lines_of_raw($log) : (); join "\n", @l }
my $root = $> == 0;

subtest 'perl Makefile.PL asks for run-time packages only' => sub {
    my $dir = scratch();
    reset_state(@RUN);
    my ( $code, $out ) = run_in( $dir, $^X, 'Makefile.PL' );
    is $code, 0, 'with the run-time packages there, it goes ahead' or diag $out;
    is asked_for(), '', '...without apt-get, though no test package is installed';
    ( $code, $out ) = run_in( $dir, 'make', '-n', 'run' );
    unlike $out, qr/ensure_test/, 'make run does not ask for the test packages';

    reset_state( grep { $_ ne 'libperl-dev' && $_ ne 'libio-async-perl' } @RUN );
    ( $code, $out ) = run_in( $dir, $^X, 'Makefile.PL' );
    if ($root) {
        is $code, 0, 'as root, it installs what is missing' or diag $out;
        like asked_for(), qr/^install -y libperl-dev libio-async-perl$/m, 'exactly the missing run-time packages';
    }
    else {
        is $code, 1, 'as a user, it stops' or diag $out;
        like $out, qr/sudo apt-get install -y libperl-dev libio-async-perl\n/, 'naming exactly the missing run-time packages';
    }
    unlike $out . asked_for(), qr/chromium|wrk|nghttp2/, 'never Chromium, wrk or nghttp2';
};

subtest 'make test-deps (and so make test) asks for the test packages' => sub {
    my $dir = scratch();
    reset_state(@RUN);
    run_in( $dir, $^X, 'Makefile.PL' );
    my ( $code, $out ) = run_in( $dir, 'make', 'test-deps' );
    my $asked = $root ? asked_for() : $out;
    for my $pkg (@TEST) {
        like $asked, qr/\b\Q$pkg\E\b/, "$pkg";
    }
    unlike $asked, qr/libperl-dev/, 'not the run-time ones, which are there';
    if ($root) { is $code, 0, 'installed as root' or diag $out }
    else       { isnt $code, 0, 'a user is told what to install' }
    ( $code, $out ) = run_in( $dir, 'make', '-n', 'test' );
    like $out, qr/ensure_test/, 'make test runs test-deps first';
};

done_testing;
