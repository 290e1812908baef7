package PagiRS::MethodRounds;

# Method calls that Future::AsyncAwait makes by name (call_method), around
# every way Perl lets a program change which method a name finds.  run()
# returns one line per call, "label => result"; t/18-method-cache.t compares
# what it returns under system perl with what it returns inside pagi-rs,
# whose call_method caches the methods it finds (src/interp/c/method_cache.c).
# Any answer the cache kept too long shows as a different line.
#
# Each class below is an awaitable: `await $obj` asks AWAIT_IS_READY and then
# AWAIT_GET, by name, of the object's class.

use strict;
use warnings;
no warnings qw(redefine once);
use Future::AsyncAwait;
use Symbol ();
use mro ();
use List::Util ();
use Scalar::Util ();

## no critic (ProhibitMultiplePackages)
{

    package PagiRS::MethodRounds::Ready;
    sub new { my ( $class, $v ) = @_; return bless { v => $v }, $class }
    sub AWAIT_IS_READY     { 1 }
    sub AWAIT_IS_CANCELLED { 0 }
}

sub _class {
    my ( $name, @isa ) = @_;
    no strict 'refs';
    @{"${name}::ISA"} = ( @isa, 'PagiRS::MethodRounds::Ready' );
    return $name;
}

sub _define {
    my ( $name, $text ) = @_;
    no strict 'refs';
    *{$name} = sub { "$text:$_[0]{v}" };
    return;
}

my $awaiting = async sub { my ($awaitable) = @_; return await $awaitable };

sub run {
    my @lines;
    my $t = sub {
        my ( $label, $obj ) = @_;
        my $got = eval { $awaiting->($obj)->get };
        $got = 'died: ' . ( $@ =~ s/ at .*//sr =~ s/\n//r ) unless defined $got;
        push @lines, "$label => $got\n";
    };
    my $P = 'PagiRS::MethodRounds';
    for my $round ( 1 .. 2 ) {
        my $Own = _class("${P}::Own");
        _define( "${Own}::AWAIT_GET", 'own' );
        $t->( "own method", $Own->new(1) );
        $t->( "own method again", $Own->new(2) );
        _define( "${Own}::AWAIT_GET", 'glob' );
        $t->( "glob assignment", $Own->new(3) );
        eval "sub ${Own}::AWAIT_GET { 'eval:' . \$_[0]{v} } 1" or die $@;
        $t->( "sub compiled by eval", $Own->new(4) );
        {
            no strict 'refs';
            local *{"${Own}::AWAIT_GET"} = sub { "local:$_[0]{v}" };
            $t->( "local glob", $Own->new(5) );
        }
        $t->( "after the local glob", $Own->new(6) );
        {
            no strict 'refs';
            ${"${Own}::"}{AWAIT_GET} = sub { "stashref:$_[0]{v}" };
        }
        $t->( "stash entry replaced by a code ref", $Own->new(61) );
        {
            no strict 'refs';
            *{"${Own}::AWAIT_GET"}{CODE};
            my $gv = \${"${Own}::"}{AWAIT_GET};
        }
        $t->( "after the stash ref", $Own->new(62) );
        {
            no strict 'refs';
            my $Src = _class("${P}::Src");
            _define( "${Src}::AWAIT_GET", 'src' );
            *{"${Own}::AWAIT_GET"} = *{"${Src}::AWAIT_GET"};
            $t->( "glob assigned a glob", $Own->new(63) );
            undef *{"${Own}::AWAIT_GET"};
            $t->( "glob undefined", $Own->new(64) );
            _define( "${Own}::AWAIT_GET", 'back' );
            $t->( "defined again", $Own->new(65) );
            my $kept = $Own->new(66);
            %{"${Own}::"} = ();
            $t->( "stash emptied", $kept );
            _class($Own);
            _define( "${Own}::AWAIT_GET", 'refilled' );
            $t->( "stash refilled", $Own->new(67) );
        }

        my $Base  = _class("${P}::Base");
        my $Other = _class("${P}::Other");
        my $Kid   = _class( "${P}::Kid", $Base );
        _define( "${Base}::AWAIT_GET",  'base' );
        _define( "${Other}::AWAIT_GET", 'other' );
        $t->( "inherited", $Kid->new(7) );
        $t->( "inherited again", $Kid->new(8) );
        _define( "${Base}::AWAIT_GET", 'newbase' );
        $t->( "parent redefined", $Kid->new(9) );
        _class( $Kid, $Other );
        $t->( "\@ISA changed", $Kid->new(10) );
        _define( "${Kid}::AWAIT_GET", 'kid' );
        $t->( "own method shadows", $Kid->new(11) );
        {
            no strict 'refs';
            delete ${"${Kid}::"}{AWAIT_GET};
        }
        $t->( "own method deleted", $Kid->new(12) );
        my $moved = $Own->new(13);
        bless $moved, $Base;
        $t->( "reblessed", $moved );
        {
            no warnings;
            no strict 'refs';
            undef &{"${Other}::AWAIT_GET"};
        }
        $t->( "body undefined", $Kid->new(14) );
        _define( "${Other}::AWAIT_GET", 'other' );

        # A diamond, under each method resolution order.
        my $Top   = _class("${P}::Top");
        my $Left  = _class( "${P}::Left",  $Top );
        my $Right = _class( "${P}::Right", $Top );
        my $Low   = _class( "${P}::Low",   $Left, $Right );
        _define( "${Top}::AWAIT_GET",   'top' );
        _define( "${Right}::AWAIT_GET", 'right' );
        $t->( "diamond, dfs", $Low->new(15) );
        mro::set_mro( $Low, 'c3' );
        $t->( "diamond, c3", $Low->new(16) );
        mro::set_mro( $Low, 'dfs' );
        $t->( "diamond, dfs again", $Low->new(17) );

        # A method found only by AUTOLOAD is left to Perl.
        my $Auto = _class("${P}::Auto");
        eval "package $Auto; our \$AUTOLOAD; sub AUTOLOAD { 'autoload:' . \$AUTOLOAD } sub DESTROY { } 1"
          or die $@;
        $t->( "AUTOLOAD", $Auto->new(18) );

        # A method that dies.
        my $Dies = _class("${P}::Dies");
        {
            no strict 'refs';
            *{"${Dies}::AWAIT_GET"} = sub { die "no result\n" };
        }
        $t->( "a method that dies", $Dies->new(19) );

        # Packages deleted and made again, more of them than the cache holds.
        for my $n ( 1 .. 150 ) {
            my $Gone = _class("${P}::Gone$n");
            _define( "${Gone}::AWAIT_GET", "gone$n" );
            my $obj = $Gone->new($round);
            $t->( "package $n", $obj );
            Symbol::delete_package($Gone);
            $t->( "package $n deleted", $obj ) if $n % 50 == 0;
        }
        my $Again = _class("${P}::Gone1");
        _define( "${Again}::AWAIT_GET", 'reborn' );
        $t->( "package made again", $Again->new(20) );
        Symbol::delete_package($_) for map "${P}::$_", qw(Own Base Other Kid Top Left Right Low Auto Dies Gone1);
    }
    push @lines, _xsub_methods();
    push @lines, _class_names();
    return @lines;
}

# Class methods called on a class given by name: an async sub that returns
# without suspending makes Future::AsyncAwait call AWAIT_NEW_DONE on its
# future class, by name.  Perl takes a name for a class at once when its
# stash cache knows the name, and otherwise first looks for a filehandle of
# that name; so "RoundsFH" (a filehandle in this package, and a package
# too) names the filehandle until a bless by that name caches the class.
sub _class_names {
    my @lines;
    my @names = ( 'PagiRS::MethodRounds::Fut', 'RoundsFH' );
    my %returning;
    for my $class (@names) {
        $returning{$class} = eval qq{
            use Future::AsyncAwait future_class => '$class';
            async sub { return \$_[0] };
        } or die $@;
    }
    my $t = sub {
        my ( $label, $class, $v ) = @_;
        my $got = eval {
            my $f = $returning{$class}->($v);
            ref($f) eq 'ARRAY' ? "@$f" : ref($f) || $f;
        };
        $got = 'died: ' . ( $@ =~ s/ at .*//sr =~ s/\n//r ) unless defined $got;
        push @lines, "class $class, $label => $got\n";
    };
    no strict 'refs';
    for my $class (@names) {
        @{"${class}::ISA"} = ('PagiRS::MethodRounds::FutBase');
        *{"PagiRS::MethodRounds::FutBase::AWAIT_NEW_DONE"} = sub { [ 'base', $_[0], $_[1] ] };
    }
    open( RoundsFH, '<', '/dev/null' ) or die "cannot open /dev/null: $!";
    for my $try ( 1, 2 ) {
        for my $class (@names) {
            $t->( "inherited, try $try", $class, 1 );
            *{"${class}::AWAIT_NEW_DONE"} = sub { [ 'own', $_[0], $_[1] ] };
            $t->( "own, try $try", $class, 2 );
            $t->( "own again, try $try", $class, 3 );
            *{"${class}::AWAIT_NEW_DONE"} = sub { [ 'glob', $_[0], $_[1] ] };
            $t->( "glob assignment, try $try", $class, 4 );
            delete ${"${class}::"}{AWAIT_NEW_DONE};
            $t->( "own deleted, try $try", $class, 5 );
            @{"${class}::ISA"} = ('PagiRS::MethodRounds::FutOther');
            *{"PagiRS::MethodRounds::FutOther::AWAIT_NEW_DONE"} = sub { [ 'other', $_[0], $_[1] ] };
            $t->( "\@ISA changed, try $try", $class, 6 );
            @{"${class}::ISA"} = ('PagiRS::MethodRounds::FutBase');
        }
        # The class is known by name from here on: Perl's stash cache has it.
        my $blessed = bless {}, 'RoundsFH';
        $t->( "after a bless by name, try $try", 'RoundsFH', 7 );
        *{"RoundsFH::AWAIT_NEW_DONE"} = sub { [ 'own', $_[0], $_[1] ] };
        $t->( "own, known by name, try $try", 'RoundsFH', 71 );
        *{"RoundsFH::AWAIT_NEW_DONE"} = sub { [ 'glob', $_[0], $_[1] ] };
        $t->( "glob assignment, known by name, try $try", 'RoundsFH', 72 );
        delete ${"RoundsFH::"}{AWAIT_NEW_DONE};
        $t->( "own deleted, known by name, try $try", 'RoundsFH', 73 );
        if ( $try == 1 ) {
            Symbol::delete_package('RoundsFH');
            $t->( "package deleted", 'RoundsFH', 8 );
            close RoundsFH;
            $t->( "package deleted, filehandle closed", 'RoundsFH', 9 );
            open( RoundsFH, '<', '/dev/null' ) or die "cannot open /dev/null: $!";
        }
    }
    close RoundsFH;

    # $Future::TIMES makes pagi-rs's AWAIT_NEW_DONE (an XSUB, pending.c)
    # hand the call to Future's own method in Perl, from inside the XSUB.
    for my $try ( 1, 2 ) {
        local $Future::TIMES = 1;
        my $f    = ( async sub { return 'timed' } )->();
        my $got  = eval { join ',', ref $f, $f->get, defined $f->btime ? 'with btime' : 'no btime' };
        push @lines, "Future::TIMES, try $try => " . ( $got // 'died: ' . ( $@ =~ s/ at .*//sr =~ s/\n//r ) ) . "\n";
    }
    return @lines;
}

# Methods that are XSUBs, which pagi-rs runs without call_sv: each answer
# must still depend on the context the await wants (List::Util::uniq counts
# in scalar context), take the last of several values in scalar context
# (List::Util::zip returns a list whatever the context), give undef for no
# value, and die as the XSUB dies.  Twice each: a lookup, then the cache.
sub _xsub_methods {
    my $P = 'PagiRS::MethodRounds';
    my %classes = (
        Uniq  => [ \&List::Util::uniq,     sub { bless {}, shift } ],
        Zip   => [ \&List::Util::zip,      sub { bless [ 1, 2, 3 ], shift } ],
        Empty => [ \&List::Util::zip,      sub { bless [], shift } ],
        Usage => [ \&Scalar::Util::dualvar, sub { bless {}, shift } ],
    );
    my $show;
    $show = sub {
        my ($v) = @_;
        return 'undef' unless defined $v;
        return ref($v) eq 'ARRAY' ? '[' . join( ',', map { $show->($_) } @$v ) . ']' : ref($v) || $v;
    };
    my $scalar = async sub { my $v = await $_[0]; return $show->($v) };
    my $list   = async sub { my @v = await $_[0]; return scalar(@v) . ':' . join ',', map { $show->($_) } @v };
    my @lines;
    for my $name ( sort keys %classes ) {
        my ( $get, $new ) = @{ $classes{$name} };
        my $class = "${P}::Xs$name";
        {
            no strict 'refs';
            *{"${class}::AWAIT_IS_READY"}     = \&Scalar::Util::blessed;
            *{"${class}::AWAIT_IS_CANCELLED"} = sub { 0 };
            *{"${class}::AWAIT_GET"}          = $get;
        }
        for my $try ( 1, 2 ) {
            for my $context ( [ scalar => $scalar ], [ list => $list ] ) {
                my ( $want, $awaiting ) = @$context;
                my $got = eval { $awaiting->( $new->($class) )->get };
                $got = 'died: ' . ( $@ =~ s/ at .*//sr =~ s/\n//r ) unless defined $got;
                push @lines, "XSUB $name, $want, try $try => $got\n";
            }
        }
    }
    return @lines;
}

1;
