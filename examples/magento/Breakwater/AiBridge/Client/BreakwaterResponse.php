<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Client;

/**
 * One answer from breakwater, with its x-breakwater-* headers read case-insensitively
 * (names and the token values: `X-Breakwater-Outcome: AI` reads as "ai").
 */
final class BreakwaterResponse
{
    /** @var array<string, string> lower-case name => value (repeated headers joined with ", ") */
    private array $headers;

    /**
     * @param array<string, string> $headers any case
     */
    public function __construct(
        public readonly int $status,
        array $headers,
        public readonly string $body,
        public readonly string $requestId
    ) {
        $this->headers = [];
        foreach ($headers as $name => $value) {
            $this->addHeader((string) $name, (string) $value);
        }
    }

    /**
     * From raw header lines as curl hands them over (status line, `Name: value`, blank line).
     *
     * @param list<string> $lines
     */
    public static function fromHeaderLines(int $status, array $lines, string $body, string $sentRequestId): self
    {
        $r = new self($status, [], $body, $sentRequestId);
        foreach ($lines as $line) {
            if (str_starts_with($line, 'HTTP/')) {
                $r->headers = []; // a 100 Continue or a redirect came first: keep the last block
                continue;
            }
            $colon = strpos($line, ':');
            if ($colon === false) {
                continue;
            }
            $r->addHeader(substr($line, 0, $colon), substr($line, $colon + 1));
        }
        $echoed = $r->header('x-request-id');
        return $echoed === null || $echoed === $sentRequestId
            ? $r
            : new self($status, $r->headers, $body, $echoed);
    }

    private function addHeader(string $name, string $value): void
    {
        $name = strtolower(trim($name));
        $value = trim($value);
        $this->headers[$name] = isset($this->headers[$name]) ? $this->headers[$name] . ', ' . $value : $value;
    }

    public function header(string $name): ?string
    {
        return $this->headers[strtolower($name)] ?? null;
    }

    /** @return array<string, string> */
    public function headers(): array
    {
        return $this->headers;
    }

    private function token(string $name): ?string
    {
        $v = $this->header($name);
        return $v === null || $v === '' ? null : strtolower($v);
    }

    /** ai | fallback | error; "" when the answer did not come through breakwater. */
    public function outcome(): string
    {
        return $this->token('x-breakwater-outcome') ?? '';
    }

    public function isAi(): bool
    {
        return $this->outcome() === 'ai';
    }

    public function isFallback(): bool
    {
        return $this->outcome() === 'fallback';
    }

    /** cache | upstream | static, on a fallback. */
    public function fallback(): ?string
    {
        return $this->token('x-breakwater-fallback');
    }

    /** breaker_open | timeout | upstream_5xx | connect_error | ai_disabled | overloaded | internal */
    public function reason(): ?string
    {
        return $this->token('x-breakwater-reason');
    }

    /** The model version the AI reported (AI answers only); kept as sent, not lower-cased. */
    public function modelVersion(): ?string
    {
        return $this->header('x-breakwater-model-version');
    }

    /** queued | spooled | rejected, on a replayable request the AI did not answer. */
    public function dlq(): ?string
    {
        return $this->token('x-breakwater-dlq');
    }

    /** breakwater holds the request and will publish the AI's answer to ai.result.<route>. */
    public function awaitsReplay(): bool
    {
        return in_array($this->dlq(), ['queued', 'spooled'], true);
    }

    /** @return mixed the body decoded as JSON (null when it is not JSON) */
    public function json(): mixed
    {
        try {
            return json_decode($this->body, true, 512, JSON_THROW_ON_ERROR);
        } catch (\JsonException) {
            return null;
        }
    }
}
