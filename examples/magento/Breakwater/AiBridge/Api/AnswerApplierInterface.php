<?php
declare(strict_types=1);

namespace Breakwater\AiBridge\Api;

use Breakwater\AiBridge\Result\ResultMessage;

/**
 * The shop's own use of a replayed AI answer (store a grade, release an order held for
 * fraud scoring, ...). Called by ResultHandler at most once per request id, inside the
 * pending store's lock or transaction: throw to have the message redelivered later.
 */
interface AnswerApplierInterface
{
    /**
     * @param array<string, mixed>|null $pendingRow the row recorded when breakwater queued
     *        the request, or null if the shop never recorded one
     */
    public function apply(ResultMessage $result, ?array $pendingRow): void;
}
