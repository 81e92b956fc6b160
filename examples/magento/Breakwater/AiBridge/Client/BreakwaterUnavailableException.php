<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Client;

/**
 * breakwater itself could not be reached or did not answer within the client's timeout
 * (never an HTTP status: every answer, 5xx included, is a BreakwaterResponse). The shop takes
 * its own non-AI path; the request was not queued for replay.
 */
final class BreakwaterUnavailableException extends \RuntimeException
{
    public function __construct(string $message, public readonly string $requestId, ?\Throwable $previous = null)
    {
        parent::__construct($message, 0, $previous);
    }
}
