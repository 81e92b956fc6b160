<?php
/**
 * Plain-PHP test harness: a PSR-4 autoloader for the module (what composer's autoload does
 * in Magento) and a tiny assertion helper. No PHPUnit needed.
 */
declare(strict_types=1);

spl_autoload_register(static function (string $class): void {
    $prefix = 'Breakwater\\AiBridge\\';
    if (str_starts_with($class, $prefix)) {
        $file = __DIR__ . '/../Breakwater/AiBridge/' . str_replace('\\', '/', substr($class, strlen($prefix))) . '.php';
        if (is_file($file)) {
            require $file;
        }
    }
});

final class Check
{
    public static int $passed = 0;

    public static function that(bool $ok, string $what, mixed $detail = null): void
    {
        if (!$ok) {
            $extra = $detail === null ? '' : ': ' . (is_string($detail) ? $detail : json_encode($detail, JSON_UNESCAPED_SLASHES));
            fwrite(STDERR, "FAIL - $what$extra\n");
            exit(1);
        }
        self::$passed++;
        echo "ok - $what\n";
    }

    public static function same(mixed $expected, mixed $actual, string $what): void
    {
        self::that($expected === $actual, $what, ['expected' => $expected, 'actual' => $actual]);
    }

    /** @param callable(): void $fn */
    public static function throws(string $class, callable $fn, string $what): void
    {
        try {
            $fn();
        } catch (\Throwable $e) {
            self::that($e instanceof $class, $what, get_class($e) . ': ' . $e->getMessage());
            return;
        }
        self::that(false, $what, "no $class thrown");
    }
}
